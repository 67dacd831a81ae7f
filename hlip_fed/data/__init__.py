"""The medical data path: NIfTI and DICOM scans in, HLIP-ready tensors out.

``readers`` turns a file or series folder into a :class:`~hlip_fed.data.volume.Volume` in one
canonical orientation; ``preprocess`` makes the model's input tensor; ``manifest``, ``check`` and
``dataset`` handle a hospital's site folder (see ``docs/site-layout.md``); ``cache`` keeps
preprocessed tensors on site so that later epochs skip decoding. Every problem with an input file is
a :class:`~hlip_fed.data.errors.DataError` whose message names the file and the reason.
"""

from hlip_fed.data.errors import DataError
from hlip_fed.data.volume import Volume

__all__ = ["DataError", "Volume"]
