"""S3-compatible gateway (frontend) and storage nodes (backends) that offload large GETs.

The code lives inside the `xo` package so that it installs, type-checks and runs with `xo`
(`xo s3-gateway`, `xo s3-node`) and calls the offload API in-process; integrations/rgw/ holds
the example configs and the entry points for running it outside the `xo` command.
"""
