"""Procedural NTU-format skeleton corpus: body model, motion programs, cameras and Kinect faults.

``body`` (proportions, forward kinematics), ``motion`` (styles, keyframes, gait), ``actions`` (one
motion program per NTU class), ``camera`` (setups, the three Kinects, projection), ``faults``
(jitter, inferred joints, noise bodies, id switches, empty frames) and ``sample`` (one file) are used
by the ``synthesize`` stage (``stages/synthesize.py``).
"""
