"""flashmath.lab: the experiments behind ``flashmath lab`` and the runner that writes them up.

Owns: ``runner`` (run folders, atomic files, manifest.json, report.md, the exit codes),
``experiment`` (what an experiment returns), ``registry`` (the experiments in run order),
``readme`` and ``seeds`` (README sections answering the seed labs' questions), ``report``,
``plotting``, and one module per experiment. May import every layer below it (and the
public ``flashmath`` API); nothing in the package imports lab, except the ``lab`` command.
"""
