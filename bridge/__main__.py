"""`python -m bridge` is the `chatbridge` command."""

from bridge.cli import main

raise SystemExit(main())
