"""What the three programs share that is not wire code: configuration (command line,
TOML file, ``JOBSCHED_*`` variables), the secret file, the scheduler file, and the
daemon runtime (event loop, signals, logging)."""
