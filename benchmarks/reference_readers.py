"""The public reference readers of NTU RGB+D ``.skeleton`` files, kept as speed baselines.

Both are re-implemented from the public code with their per-line Python/NumPy work exactly as they do
it; only what no longer runs was fixed and their printing/logging dropped. The pipeline never uses
them: ``benchmarks/parse_throughput.py`` times them against ``stages.parse`` in the same run.

- :func:`read_txt2npy`: the dataset authors' ``txt2npy.py`` (github.com/shahroudy/NTURGB-D,
  ``Python/txt2npy.py``), function ``_read_skeleton(file_path, save_skelxyz, save_rgbxy,
  save_depthxy)`` with all three outputs on (its defaults).
- :func:`read_ctrgcn`: CTR-GCN's ``data/ntu120/get_raw_skes_data.py`` (github.com/Uason-Chen/CTR-GCN),
  function ``get_raw_bodies_data(skes_path, ske_name, frames_drop_skes, frames_drop_logger)``.
"""

from __future__ import annotations

import os.path as osp

import numpy as np


def read_txt2npy(file_path: str) -> dict:
    """``txt2npy.py::_read_skeleton``: skel (F, 25, 3), rgb (F, 25, 2), depth (F, 25, 2) per body slot.

    Changes from the original: the three ``save_*`` flags are fixed to their default ``True``; the
    file is closed by ``with`` instead of ``open``/``close`` (same ``readlines`` in text mode);
    ``'skel_body{}'.format(body)`` keys are f-strings (once per body, not per joint line);
    ``file_path`` may be a ``Path``. The per-joint-line work is unchanged.
    """
    file_path = str(file_path)
    save_skelxyz = save_rgbxy = save_depthxy = True
    with open(file_path) as f:
        datas = f.readlines()
    max_body = 4
    njoints = 25

    # specify the maximum number of the body shown in the sequence, start from 1 to 4
    nframe = int(datas[0][:-1])
    bodymat = dict()
    bodymat["file_name"] = file_path[-29:-9]
    nbody = int(datas[1][:-1])  # noqa: F841 - read but unused, as in the original
    bodymat["nbodys"] = []
    bodymat["njoints"] = njoints
    for body in range(max_body):
        if save_skelxyz:
            bodymat[f"skel_body{body}"] = np.zeros(shape=(nframe, njoints, 3))
        if save_rgbxy:
            bodymat[f"rgb_body{body}"] = np.zeros(shape=(nframe, njoints, 2))
        if save_depthxy:
            bodymat[f"depth_body{body}"] = np.zeros(shape=(nframe, njoints, 2))
    # above prepare the data holder
    cursor = 0
    for frame in range(nframe):
        cursor += 1
        bodycount = int(datas[cursor][:-1])
        if bodycount == 0:
            continue
        # skip the empty frame
        bodymat["nbodys"].append(bodycount)
        for body in range(bodycount):
            cursor += 1
            skel_body = f"skel_body{body}"
            rgb_body = f"rgb_body{body}"
            depth_body = f"depth_body{body}"

            bodyinfo = datas[cursor][:-1].split(" ")  # noqa: F841 - parsed but unused, as in the original
            cursor += 1

            njoints = int(datas[cursor][:-1])
            for joint in range(njoints):
                cursor += 1
                jointinfo = datas[cursor][:-1].split(" ")
                jointinfo = np.array(list(map(float, jointinfo)))
                if save_skelxyz:
                    bodymat[skel_body][frame, joint] = jointinfo[:3]
                if save_depthxy:
                    bodymat[depth_body][frame, joint] = jointinfo[3:5]
                if save_rgbxy:
                    bodymat[rgb_body][frame, joint] = jointinfo[5:7]
    # prune the abundant bodys
    for each in range(max_body):
        if each >= max(bodymat["nbodys"]):
            if save_skelxyz:
                del bodymat[f"skel_body{each}"]
            if save_rgbxy:
                del bodymat[f"rgb_body{each}"]
            if save_depthxy:
                del bodymat[f"depth_body{each}"]
    return bodymat


def read_ctrgcn(path: str) -> dict:
    """``get_raw_skes_data.py::get_raw_bodies_data``: bodies by bodyID string, frames stacked with vstack.

    Returns ``{'name', 'data': {bodyID: {'joints' (25*F, 3), 'colors' (F, 25, 2), 'interval',
    'motion'}}, 'num_frames'}`` as the original does. Changes from the original: ``skes_path`` and
    ``ske_name`` come from ``path``; ``frames_drop_skes`` is a local dict instead of an argument;
    ``np.int`` (removed in NumPy 1.24) is ``int``; the ``print`` and ``frames_drop_logger`` calls are
    dropped; the assert messages are f-strings. The per-joint-line work is unchanged.
    """
    skes_path, file_name = osp.split(str(path))
    ske_name = file_name[: -len(".skeleton")]
    frames_drop_skes = dict()

    ske_file = osp.join(skes_path, ske_name + ".skeleton")
    assert osp.exists(ske_file), f"Error: Skeleton file {ske_file} not found"
    # Read all data from .skeleton file into a list (in string format)
    with open(ske_file) as fr:
        str_data = fr.readlines()

    num_frames = int(str_data[0].strip("\r\n"))
    frames_drop = []
    bodies_data = dict()
    valid_frames = -1  # 0-based index
    current_line = 1

    for f in range(num_frames):
        num_bodies = int(str_data[current_line].strip("\r\n"))
        current_line += 1

        if num_bodies == 0:  # no data in this frame, drop it
            frames_drop.append(f)  # 0-based index
            continue

        valid_frames += 1
        joints = np.zeros((num_bodies, 25, 3), dtype=np.float32)
        colors = np.zeros((num_bodies, 25, 2), dtype=np.float32)

        for b in range(num_bodies):
            bodyID = str_data[current_line].strip("\r\n").split()[0]
            current_line += 1
            num_joints = int(str_data[current_line].strip("\r\n"))  # 25 joints
            current_line += 1

            for j in range(num_joints):
                temp_str = str_data[current_line].strip("\r\n").split()
                joints[b, j, :] = np.array(temp_str[:3], dtype=np.float32)
                colors[b, j, :] = np.array(temp_str[5:7], dtype=np.float32)
                current_line += 1

            if bodyID not in bodies_data:  # Add a new body's data
                body_data = dict()
                body_data["joints"] = joints[b]  # ndarray: (25, 3)
                body_data["colors"] = colors[b, np.newaxis]  # ndarray: (1, 25, 2)
                body_data["interval"] = [valid_frames]  # the index of the first frame
            else:  # Update an already existed body's data
                body_data = bodies_data[bodyID]
                # Stack each body's data of each frame along the frame order
                body_data["joints"] = np.vstack((body_data["joints"], joints[b]))
                body_data["colors"] = np.vstack((body_data["colors"], colors[b, np.newaxis]))
                pre_frame_idx = body_data["interval"][-1]
                body_data["interval"].append(pre_frame_idx + 1)  # add a new frame index

            bodies_data[bodyID] = body_data  # Update bodies_data

    num_frames_drop = len(frames_drop)
    assert num_frames_drop < num_frames, (
        f"Error: All frames data ({num_frames}) of {ske_name} is missing or lost"
    )
    if num_frames_drop > 0:
        frames_drop_skes[ske_name] = np.array(frames_drop, dtype=int)

    # Calculate motion (only for the sequence with 2 or more bodyIDs)
    if len(bodies_data) > 1:
        for body_data in bodies_data.values():
            body_data["motion"] = np.sum(np.var(body_data["joints"], axis=0))

    return {"name": ske_name, "data": bodies_data, "num_frames": num_frames - num_frames_drop}


READERS = {"txt2npy (NTU authors)": read_txt2npy, "CTR-GCN get_raw_skes_data": read_ctrgcn}
