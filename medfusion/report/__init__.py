"""The evaluation report behind ``medfusion benchmark``.

- :mod:`dataset`: find co-registered groups (aanlib folders with splits, CSV/JSON lists, volumes);
- :mod:`perturb`: seeded noise and blur for the robustness study;
- :mod:`fusion`: load, fuse (through the engine) and score (through the metrics) one group;
- :mod:`measure`: peak memory on CPU and GPU;
- :mod:`runner`: the stages (quality, block size, robustness, speed, panels);
- :mod:`figures`, :mod:`markdown`, :mod:`files`, :mod:`output`: the report folder.
"""
