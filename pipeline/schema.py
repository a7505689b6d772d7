"""The `clips` table contract (../shared/DESIGN.md): column names, types and meanings.

One row per clip, plus one row per rejected source (clip_id null). Frame indices are 0-based
in the *source* video, end exclusive. Times are seconds. `clip_uri` is either an absolute path
to a transcoded H.264 mp4 of exactly the clip's frames (`clips: transcode`), or
`<source path>#frames=<start>-<end>` (`clips: reference`: nothing re-encoded, readers decode
that range of the source themselves).
"""
import pyarrow as pa

STATUSES = ("kept", "filtered", "duplicate", "rejected")

CLIPS_SCHEMA = pa.schema([
    ("clip_id", pa.string()),             # uuid5(source sha256 + frame range); null for a rejected source
    ("source_uri", pa.string()),
    ("source_sha256", pa.string()),
    ("start_frame", pa.int64()),          # 0-based, in the source
    ("end_frame", pa.int64()),            # exclusive
    ("shot_start_frame", pa.int64()),     # the detected shot the clip was cut from
    ("shot_end_frame", pa.int64()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("fps", pa.float64()),
    ("width", pa.int64()),                # display size, after rotation
    ("height", pa.int64()),
    ("rotation", pa.int64()),             # degrees clockwise to display upright (0/90/180/270, from the display matrix)
    ("clip_uri", pa.string()),
    ("status", pa.string()),              # kept | filtered | duplicate | rejected
    ("reason", pa.string()),              # why not kept: names the failed threshold and value
    ("motion", pa.float32()),             # mean optical-flow magnitude, pixels/frame at analysis size
    ("static", pa.bool_()),               # the clip is (mostly) a frozen hold
    ("blur", pa.float32()),               # 0..1, higher = blurrier (1 - normalised Laplacian variance)
    ("sharpness", pa.float32()),          # variance of the Laplacian at analysis size
    ("brightness", pa.float32()),         # mean luma 0..1
    ("contrast", pa.float32()),           # std of luma 0..1
    ("text_ratio", pa.float32()),         # fraction of frame area covered by burned-in text
    ("aesthetic", pa.float32()),
    ("embedding", pa.list_(pa.float32())),
    ("dup_of", pa.string()),
    ("caption_teacher_short", pa.string()),
    ("caption_teacher_dense", pa.string()),
    ("caption_short", pa.string()),
    ("caption_dense", pa.string()),
    ("caption_model", pa.string()),
    ("spec_hash", pa.string()),
    ("code_version", pa.string()),
])

COLUMNS = tuple(CLIPS_SCHEMA.names)
