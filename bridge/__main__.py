"""`python -m bridge` is the `chatbridge` command."""

from bridge.launch import main

raise SystemExit(main())
