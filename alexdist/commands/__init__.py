"""The command line: one module per `alexdist COMMAND`, each argument parsing and output only (the work is in
the library: training/, artifacts/, tracking/). `alexdist.cli` dispatches to them."""
