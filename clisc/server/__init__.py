"""The remote engine: `clisc serve` runs CLISC on a GPU machine for clients without torch (Slicer's CLISCLib.remote).

    wire      what travels: arrays as gzip NRRD with their IJK→RAS, the API version and its mismatch message
              (numpy and pynrrd only: the client imports it too)
    models    the models and trained runs a server offers, by name, loaded once per device
    sessions  uploaded volumes kept with their refiners (SAM embeddings), until closed or idle too long
    jobs      the job queue: one job at a time per device, queue positions, progress, cancel
    app       the HTTP API (FastAPI): authentication, limits, the endpoints
    command   ``clisc serve``: its options, the API key, TLS, uvicorn

Only `wire` is imported by clients; the rest needs the ``server`` extra (``pip install 'clisc[server]'``).
"""
