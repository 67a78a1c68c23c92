"""Stand-in for the `fpsample` package on the benchmark machine, which has no cp312 wheel of it.

nerfstudio imports it at module level but only calls it for train_cameras_sampling_strategy="fps" (not the default).
"""


def bucket_fps_kdline_sampling(*args, **kwargs):
    raise NotImplementedError("fpsample is not installed on this machine; use the default camera sampling strategy")
