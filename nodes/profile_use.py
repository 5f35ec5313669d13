"""A loaded profile during a run (an observer of the override, nodes/observers.py): notes where
the run's resolution or token order differs from the profile's, and the readout's `profile` entry.
Which params a block gets, and whether a block runs all dense, is the config's business
(SpargeConfig.params_for_layer / layer_all_dense)."""
from __future__ import annotations

from typing import Optional

import torch

from .observers import ObservedCall, Observer


class ProfileUse(Observer):
    def __init__(self, loaded, notes=()):
        self.loaded = loaded  # profile_files.LoadedProfile
        self.notes = list(notes)  # from fitting the profile to the model (profile_files.check_fits)

    def before_sparse(self, call: ObservedCall) -> Optional[str]:
        # a note is a Python-side lookup; under torch.compile it is skipped (as the readout allows)
        if torch.compiler.is_compiling() or call.run is None or call.layer is None:
            return None
        if self.loaded.params_for_layer(call.layer, None) is None:
            return None
        note = self.loaded.note_for(call.tokens, call.grid)
        if note and note not in call.run.profile_notes:
            call.run.profile_notes.append(note)
        return None

    def readout(self, run) -> dict:
        loaded = self.loaded
        prof = loaded.profile
        used = sorted(b for b in run.blocks_with_sparse_calls() if loaded.params_for_layer(b, None) is not None)
        return {"profile": {
            "name": loaded.name,
            "model_family": prof.model_family,
            "layers": prof.layers,
            "heads": prof.heads,
            "mode": prof.mode,
            "fill_skipped": prof.fill_skipped,
            "target_l1": prof.target_l1,
            "n_tokens": prof.n_tokens,
            "grid": list(prof.grid) if prof.grid else None,
            "calibrated_layers": [i for i, c in enumerate(loaded.calibrated) if c],
            "layers_used": used,  # blocks whose sparse calls ran with the profile's params
            "params": loaded.describe_layers(),  # per block: the per-head thresholds the kernel got
            "notes": list(run.profile_notes) + self.notes,
        }}
