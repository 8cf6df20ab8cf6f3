"""`python -m router` is `spark-router`."""

from router.cli import main

main()
