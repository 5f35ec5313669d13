"""Structural validation of an API-format prompt (what app.graphToPrompt() returns) against the
server's /object_info, for graphs the tests cannot run: every node type exists, every required
input is connected or set, every link comes from an existing node's output of the right type, combo
values are legal (except the model / image file names a user brings), numbers lie in their range.
"""
from __future__ import annotations

# inputs whose values are files in the user's models / input folders (not in the test server's lists)
FILE_INPUTS = {"unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name", "ckpt_name",
               "lora_name", "image"}


def _spec_list(info: dict):
    for section in ("required", "optional"):
        for name, spec in ((info.get("input") or {}).get(section) or {}).items():
            yield name, spec, section


def _combo(spec):
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}).get("options")
    return None


def check_prompt(prompt: dict, object_info: dict, file_inputs=FILE_INPUTS) -> list[str]:
    problems = []
    for nid, node in prompt.items():
        ctype = node.get("class_type")
        info = object_info.get(ctype)
        if info is None:
            problems.append(f"node {nid}: unknown type {ctype!r}")
            continue
        inputs = node.get("inputs") or {}
        specs = {name: (spec, section) for name, spec, section in _spec_list(info)}
        for name in inputs:
            if name not in specs:
                problems.append(f"node {nid} ({ctype}): input {name!r} is not in its definition")
        for name, (spec, section) in specs.items():
            if name not in inputs:
                if section == "required":
                    problems.append(f"node {nid} ({ctype}): required input {name!r} is missing")
                continue
            value = inputs[name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(value, list):  # a link [node id, output slot]
                src = prompt.get(str(value[0]))
                if src is None:
                    problems.append(f"node {nid} ({ctype}).{name}: link from missing node {value[0]}")
                    continue
                src_info = object_info.get(src["class_type"], {})
                outs = src_info.get("output") or []
                if not (0 <= int(value[1]) < len(outs)):
                    problems.append(f"node {nid} ({ctype}).{name}: {src['class_type']} has no output {value[1]}")
                    continue
                out_type, want = outs[int(value[1])], spec[0]
                if not isinstance(want, list) and want not in ("*", out_type) and out_type != "*":
                    problems.append(f"node {nid} ({ctype}).{name}: {out_type} into {want}")
                continue
            options = _combo(spec)
            if options is not None:
                if name in file_inputs:
                    if not isinstance(value, str) or not value:
                        problems.append(f"node {nid} ({ctype}).{name}: file name {value!r}")
                elif value not in options:
                    problems.append(f"node {nid} ({ctype}).{name}: {value!r} not in {options}")
                continue
            kind = spec[0]
            if kind in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    problems.append(f"node {nid} ({ctype}).{name}: {value!r} is not a number")
                    continue
                if kind == "INT" and int(value) != value:
                    problems.append(f"node {nid} ({ctype}).{name}: {value!r} is not an integer")
                if "min" in opts and value < opts["min"]:
                    problems.append(f"node {nid} ({ctype}).{name}: {value} < min {opts['min']}")
                if "max" in opts and value > opts["max"]:
                    problems.append(f"node {nid} ({ctype}).{name}: {value} > max {opts['max']}")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"node {nid} ({ctype}).{name}: {value!r} is not a boolean")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"node {nid} ({ctype}).{name}: {value!r} is not a string")
    outputs = [nid for nid, n in prompt.items() if (object_info.get(n.get("class_type")) or {}).get("output_node")]
    if not outputs:
        problems.append("no output node: the server would refuse the prompt")
    return problems
