"""The video stage: H.264 + AAC MP4 files (faststart) and fragmented-MP4 streams."""

from .encode import AAC_SAMPLE_RATE, Mp4Writer, aac_priming_samples, encode_floor, encode_mp4, stream_mp4
from .stream import FragmentedMp4Muxer

__all__ = [
    "AAC_SAMPLE_RATE",
    "FragmentedMp4Muxer",
    "Mp4Writer",
    "aac_priming_samples",
    "encode_floor",
    "encode_mp4",
    "stream_mp4",
]
