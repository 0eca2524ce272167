"""The load-test harness: every benchmark figure of the project comes from here.

    python -m loadtests SCENARIO [options]     (see `python -m loadtests --help`)
"""
