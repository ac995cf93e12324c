"""Cost benchmark of MPCFormer's approximations under SPU (issue 5).

``python -m experiments.benchmark`` is the entry point; the pieces live here so they can be
imported and tested: ``variants`` (what is compared, at which shapes), ``measure`` (one private
run, and the linear-in-layers extrapolation), ``network`` (the LAN/WAN latency model) and
``report`` (rows, ratios, JSON, markdown and the figure).
"""
