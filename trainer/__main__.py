"""`python -m trainer`: the engine's command line (train, run, validate, inspect, presets, demo); see trainer/jobs/cli.py."""

from trainer.jobs.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
