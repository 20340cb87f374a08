"""Stand-in for resemble-perth on the GPU benchmark machine (its 37 MB wheel does not fit the transfer limit).

Only the reference imports it there; its watermark step becomes the identity, so the GPU comparison excludes the
watermark on both sides (ours runs with enable_watermark=False). Never on a user's path: benchmarks/gpu_run.sh puts
this folder on the reference's PYTHONPATH only.
"""


class PerthImplicitWatermarker:
    def apply_watermark(self, wav, sample_rate=None, **kwargs):
        return wav

    def get_watermark(self, wav, sample_rate=None, **kwargs):
        return 0.0
