"""The CUDA backend: kernel sources and loading, planning, device helpers and the launchers.

Every launcher writes into outputs the caller provides and runs on CuPy's current stream. Nothing
is imported here: import the submodule you need (`cce_cupy.cuda.forward`, ...).
"""
