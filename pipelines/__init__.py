"""Prefect orchestration of the DVC pipeline: the flow ``train-ntu120`` and its ``local`` deployment."""
