"""`python -m alexdist`: the same as the `alexdist` command."""

from alexdist.cli import main

raise SystemExit(main())
