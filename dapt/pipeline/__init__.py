"""Orchestration above every other layer: pieces of a run that combine data, masking, modeling and
tracking (today the control arm; the DAPT run and base preparation are to move here)."""
