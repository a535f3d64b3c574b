"""The exit codes of the entry points, in one table.

A sweep reads a point's code to decide what to do next (record a result, retry alone, stop),
so the entry points that write a code and the ones that read it must agree; they name these.

====  ==============  =====================================================================
code  name            meaning
====  ==============  =====================================================================
0     OK              done
1     FAILED          sweep, compare: a point or entry failed (the table says which);
                      multiprocess: the processes' records differ from one process's
2     BAD_INPUT       bad input (a flag absl cannot parse included), missing data, a workdir
                      in use or not resumable, a full disk: one ``error:`` line
3     RUN_FAULT       a check found the results wrong (``RunFault``); the rounds before it
                      are on disk
4     DIVERGED        the run stopped at a non-finite loss; its results are written (a
                      result, not a failure)
5     CANNOT_SHARE    run_batch: these points cannot share a program here; nothing was run
6     WIDEN_GRID      select_tuned --extend_at_edge: the best value is at an end of the
                      grid; the grid one step wider is the last line of stdout
124   TIMED_OUT       multiprocess: ``--timeout_s`` passed (as coreutils ``timeout``)
130   INTERRUPTED     Ctrl-C (128 + SIGINT, what a shell reports); the rounds so far on disk
143   TERMINATED      SIGTERM (128 + SIGTERM); the rounds so far on disk
====  ==============  =====================================================================
"""

OK = 0
FAILED = 1
BAD_INPUT = 2
RUN_FAULT = 3
DIVERGED = 4
CANNOT_SHARE = 5
WIDEN_GRID = 6
TIMED_OUT = 124
INTERRUPTED = 130
TERMINATED = 143
