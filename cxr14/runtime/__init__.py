"""The plumbing every stage shares: one-line errors (`errors`), atomic outputs (`outputs`), SIGTERM and Ctrl-C
that unwind cleanly and the entry-point wrapper (`signals`), progress bars (`progress`), worker processes
that die with their stage (`processes`, with `forkserver_init`, what their fork server imports first), and
cores and devices (`devices`).
"""
