"""Studies: paper reproductions and ablations as one command (``dapt study <name>``).

``spec`` reads a study (conf/study/<name>.yaml), ``runner`` runs its arms as resumable ``dapt train``
processes, ``report`` generates its table from the arms' run folders.
"""
