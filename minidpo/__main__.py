"""`python -m minidpo` is the `minidpo` command."""

from minidpo.cli import main

raise SystemExit(main())
