"""Triton's CPU interpreter (3.8) re-patches triton.language for every call of a @triton.jit helper
made from inside a running kernel: an inspect.getmembers scan of the language modules, ~0.1 ms
each, ~4,000 per sparse attention call at 400 tokens. While a kernel runs, the language is already
patched (the launch patched it and restores it when the grid is done), so a helper's re-patch of
the same modules changes nothing. `install()` skips exactly those: the kernels run the same code
and give the same bits, 6-14% sooner (one full call 7.7 -> 7.2 s; two call-graph tests 56.9 ->
48.7 s, back to back).

A patch of the test tool, not of anything under test: it touches only Triton's interpreter, and
only the version it was read against; any other version runs as it comes."""
import inspect

CHECKED_VERSIONS = ("3.8.",)


def install() -> bool:
    import triton
    import triton.language as tl

    if not triton.__version__.startswith(CHECKED_VERSIONS):
        return False
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "_sparge_once", False):
        return False
    launch_langs = None  # the language modules the running launch patched (launches do not nest)

    def langs_of(fn):
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))

    class LaunchScope:  # the launch's own scope: restoring it ends the launch
        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            nonlocal launch_langs
            launch_langs = None
            self.scope.restore()

    class Unchanged:
        def restore(self):
            pass

    def patch_lang(fn):
        nonlocal launch_langs
        langs = langs_of(fn)
        if launch_langs is not None and langs <= launch_langs:
            return Unchanged()  # a helper inside a launch that already patched these modules
        scope = original(fn)
        if launch_langs is not None:
            return scope  # a helper that sees other modules: patched as Triton does it
        launch_langs = langs
        return LaunchScope(scope)

    patch_lang._sparge_once = True
    interpreter._patch_lang = patch_lang
    return True
