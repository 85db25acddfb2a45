"""`python -m controller` is the same as the `agentctl` console script."""

from controller.cli import main

raise SystemExit(main())
