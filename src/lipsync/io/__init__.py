"""Input stage: decode and validate what users send (speech audio, portrait images).

Everything here refuses bad input with an error from ``lipsync.errors`` and a one-line message;
nothing past this stage sees raw bytes.
"""

from .audio import ACCEPTED_AUDIO, WavInfo, decode_audio, frame_to_sample, iter_chunks, parse_wav
from .image import load_image, to_rgb
from .source import Sniffed, Source, sniff

__all__ = [
    "ACCEPTED_AUDIO",
    "Sniffed",
    "Source",
    "WavInfo",
    "decode_audio",
    "frame_to_sample",
    "iter_chunks",
    "load_image",
    "parse_wav",
    "sniff",
    "to_rgb",
]
