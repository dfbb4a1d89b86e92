"""Offline tools on loft_hpc HDF5 files, as the ``loft-tools`` console command (no MPI needed).

Each subcommand is a module here with ``add_arguments(parser)`` and ``run(args) -> int``; a problem
with the command line or an input file raises :class:`loft_hpc.tools.reading.ToolError`, which
:mod:`loft_hpc.tools.cli` prints as one line before exiting with status 2.
"""
