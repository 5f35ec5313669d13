"""Where the test nodes record what they saw: JSON lines in ComfyUI's output/<log_name>.jsonl."""
import json
import os
import threading


def jsonl_appender(log_name: str):
    """A function that appends one record (a JSON-able dict) as a line to output/<log_name>.jsonl;
    thread-safe (ComfyUI may call a model from more than one thread)."""
    import folder_paths

    path = os.path.join(folder_paths.get_output_directory(), f"{log_name}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = threading.Lock()

    def append(rec: dict) -> None:
        with lock, open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    return append
