"""Workarounds for bugs in the libraries ce-ray uses: one module each.

Each module names the upstream issue, what goes wrong without it, and when to remove it.

==================  =============================================================================
module              bug
==================  =============================================================================
``ray_54305``       A stopped or crashed Tune trial's Ray Train worker placement group stays reserved
``uvicorn_157``     Ray Serve's proxy (uvicorn) never times out a connection's request headers (Slowloris)
==================  =============================================================================
"""
