"""Smoothed Energy Guidance needs nothing the webui does not already ship (torch only).

The webui runs this file at every launch; it installs nothing and can never break startup.
"""

try:
    import torch

    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (1, 13):
        print(f"[SEG] torch {torch.__version__} is older than tested (2.x); SEG may not work")
except Exception as error:  # never fail the webui's launch
    print(f"[SEG] could not check torch: {error}")
