"""Synthetic demo footage with exact ground truth, made from the photographs inside scikit-image.

Each video is a few "shots": a Ken-Burns camera move (pan, tilt, zoom or a handheld static
view) over one photo, joined by hard cuts, cross-fades or fades through black, some with
burned-in text, some deliberately bad (blurred, dark, frozen, very short) and one a near-copy of
a shot in another video. Everything is drawn from a seeded RNG, so a seed gives byte-identical
ground truth and identical decoded frames, and the ground truth says exactly where every shot
starts and what it shows — the curation pipeline and the captioner are tested against it.

    gt = generate_footage("raw", seed=0, videos=8)     # -> raw/ground_truth.json + raw/video_*.mp4

Conventions: frame indices are 0-based, ranges end-exclusive, durations in seconds. Camera
directions are the camera's: "pan right" moves the view window right across the photo (so the
picture slides left on screen), "tilt up" moves it up, "zoom in" shrinks it.

Videos are planned in blocks of 8. Within every block, video 0 holds the dark shot, the short
shot and at least one dissolve and one fade; video 1 (same aspect ratio as video 0) holds the
blurred shot and the near-duplicate of a shot of video 0; video 2 holds the frozen hold and a
text overlay; the remaining videos are free draws. The plan for N videos is a prefix of the plan
for more, so `videos=3` already contains every kind of shot and `videos=60` extends the default 8.
"""
import functools
import hashlib
import json
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import cv2
import imageio_ffmpeg
import numpy as np
import skimage.data

GENERATOR = "spacetime.synthetic v2"  # v2: colours as the encoded video shows them, with a margin
BLOCK = 8

# aspect family -> (width, height); all even, as yuv420p needs.
ASPECTS = {"16:9": (320, 180), "9:16": (180, 320), "1:1": (240, 240), "4:3": (288, 216)}
FPS_CHOICES = (24, 25, 30)
DISSOLVE_FRAMES = (6, 10)         # cross-fade length, inclusive range
FADE_FRAMES = (6, 10)             # fade-out and fade-in length each
GAP_FRAMES = (4, 12)              # black frames between a fade-out and a fade-in
SHOT_SECONDS = (1.6, 4.6)         # ordinary shots
SHORT_SECONDS = (0.5, 0.9)        # the one deliberately short shot
HANDHELD_PX = 3.0                 # sway amplitude of a "static" handheld shot, output pixels
DARK_GAIN, DARK_GAMMA = 0.09, 1.3
BLUR_SIGMA = 0.04                 # Gaussian sigma of the blurred shot, fraction of the short side


@dataclass(frozen=True)
class Photo:
    """What one scikit-image photo shows, in caption words."""
    subject: str        # long noun phrase: "an astronaut in an orange flight suit"
    name: str           # short noun phrase: "an astronaut"
    scene: str          # a few scene words for the ground truth
    setting: str        # where/how, a phrase that follows the subject
    lighting: str
    style: str          # what kind of picture it is
    details: str        # one extra sentence for dense captions


PHOTOS = {
    "astronaut": Photo(
        "an astronaut in an orange flight suit", "an astronaut", "studio portrait with an American flag",
        "posing in front of an American flag and a model of the space shuttle", "even studio lighting",
        "an official portrait photograph",
        "She smiles at the camera with a white helmet resting beside her."),
    "camera": Photo(
        "a man filming with a camera on a tripod", "a cameraman", "photographer on an open lawn",
        "standing on a wide lawn with distant buildings on the horizon", "flat overcast daylight",
        "a classic documentary photograph",
        "He wears a dark coat and leans into the viewfinder of his camera."),
    "chelsea": Photo(
        "a tabby cat", "a cat", "close-up of a cat's face",
        "gazing to the side in a close-up indoors", "soft diffuse indoor light",
        "an intimate pet portrait",
        "Its green eyes, striped fur and pink nose fill much of the frame."),
    "coffee": Photo(
        "a cup of espresso on a saucer", "an espresso cup", "coffee cup on a wooden table",
        "resting on a wooden café table with a small spoon", "warm ambient café light",
        "a food and lifestyle photograph",
        "A layer of golden crema tops the coffee in the white cup."),
    "coins": Photo(
        "rows of ancient coins", "coins", "museum coins on a black background",
        "laid out in neat rows on a black background", "hard raking light",
        "a museum catalogue photograph",
        "Worn faces and inscriptions are stamped into each silver coin."),
    "hubble_deep_field": Photo(
        "a field of distant galaxies", "galaxies", "deep space telescope view",
        "scattered across the blackness of deep space", "faint points of starlight on black",
        "an astronomical telescope image",
        "Tiny spirals and red and blue smudges of light dot the darkness."),
    "immunohistochemistry": Photo(
        "a stained tissue sample under a microscope", "a tissue sample", "microscope slide of cells",
        "magnified on a glass slide", "bright-field microscope illumination",
        "a scientific microscopy image",
        "Brown-stained cell membranes curve through pale blue tissue."),
    "horse": Photo(
        "the black silhouette of a horse", "a horse silhouette", "horse silhouette on white",
        "standing in profile against a plain white background", "flat high-contrast light",
        "a minimal graphic illustration",
        "The horse's outline is crisp, with a long tail and raised head."),
    "page": Photo(
        "a printed page of text", "a printed page", "scanned book page",
        "from a technical book about image segmentation", "even scanner light",
        "a scanned document",
        "Lines of small black type run beneath a bold heading."),
    "text": Photo(
        "handwritten equations on paper", "handwritten notes", "maths notes on paper",
        "scrawled in pen across a sheet of paper", "soft, slightly uneven desk light",
        "a close-up photograph of notes",
        "Brackets, symbols and crossed-out lines slant across the page."),
    "logo": Photo(
        "a stylised snake logo", "a snake logo", "orange and green snake emblem",
        "shaped like a letter S on a white background", "flat graphic colour",
        "a clean vector-style graphic",
        "An orange and green snake curls through an oval badge."),
    "brick": Photo(
        "a brick wall", "a brick wall", "close-up of a brick wall",
        "built from long bricks in a running bond", "soft even daylight",
        "a texture photograph",
        "Thin mortar lines divide the rows of rough bricks."),
    "grass": Photo(
        "a patch of grass", "grass", "close-up of grass",
        "seen from directly above, blades tangled together", "natural outdoor light",
        "a nature texture photograph",
        "Thousands of thin blades and dry stalks cross one another."),
    "gravel": Photo(
        "a bed of gravel", "gravel", "close-up of gravel stones",
        "spread densely across the ground", "diffuse outdoor light",
        "a texture photograph",
        "Small rounded pebbles of many shades pack tightly together."),
}
# Left out on purpose: `clock` is motion-blurred; `colorwheel`, `moon` and `retina` are smooth
# all over, and `rocket` crops are mostly empty dusk sky. Their ordinary shots measure a Laplacian
# variance of ~10-20 at these sizes, against ~5 for the deliberately blurred shot after H.264, so
# a sharpness filter could not tell them from the blur defect although the ground truth would
# call them normal.

TEXTS = ("LIVE", "BREAKING NEWS", "DAY ONE", "CHAPTER TWO", "THE END", "COMING SOON",
         "FIELD NOTES", "LAB REPORT", "MISSION CONTROL", "HELLO WORLD", "NEW EPISODE",
         "SUMMER SALE", "WELCOME HOME", "LOOK CLOSER", "PART 3", "ARCHIVE 1969")

MOTIONS = (("pan", "left"), ("pan", "right"), ("tilt", "up"), ("tilt", "down"),
           ("zoom", "in"), ("zoom", "out"), ("static", "none"))


@dataclass
class ShotPlan:
    """One shot, before rendering. `window0/1` are the view window at the shot's first and last
    content frame: (cx, cy, s) with the centre as fractions of photo width/height and s the
    window height as a fraction of the largest window of the video's aspect that fits."""
    photo: str
    motion: str
    direction: str
    frames: int                         # owned frames (boundary to boundary)
    window0: tuple
    window1: tuple
    grade: str                          # natural | warm | cool | mono | sepia
    transition_in: str = "none"         # none | cut | dissolve | fade
    transition_frames: int = 0          # dissolve length, or fade-out/fade-in length each
    gap_frames: int = 0                 # black frames of a fade
    text: Optional[str] = None
    text_style: str = "subtitle"        # subtitle (bottom, outlined) | title (top bar)
    defects: list = field(default_factory=list)
    duplicate_of: Optional[tuple] = None    # (video index, shot index)
    color_shift: tuple = (1.0, 1.0, 1.0, 0.0)   # per-channel RGB gains and an offset (0..255)


@dataclass
class VideoPlan:
    file: str
    fps: int
    aspect: str
    width: int
    height: int
    shots: list


# ---------------------------------------------------------------------------------------- photos

@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """The scikit-image photo `name` as RGB uint8 (H, W, 3); greys stacked, alpha on white."""
    im = getattr(skimage.data, name)()
    if im.dtype == bool:
        im = im.astype(np.uint8) * 255
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=2)
    if im.shape[2] == 4:
        a = im[..., 3:4].astype(np.float32) / 255.0
        im = (im[..., :3] * a + 255.0 * (1.0 - a)).round().astype(np.uint8)
    if name == "hubble_deep_field":
        # Mostly black sky (mean luma 0.08): lift the shadows so the normal shots stay clearly
        # brighter than the deliberately dark one.
        im = (255.0 * (im / 255.0) ** 0.45).round().astype(np.uint8)
    return np.ascontiguousarray(im)


def _is_gray(name: str) -> bool:
    im = load_photo(name)
    return bool(np.abs(im[..., 0].astype(int) - im[..., 2]).max() < 8)


def _max_window(photo_hw: tuple, aspect: str) -> tuple:
    """Largest (width, height) in photo pixels with the output's aspect that fits the photo."""
    ph, pw = photo_hw
    w, h = ASPECTS[aspect]
    hmax = min(ph, pw * h / w)
    return hmax * w / h, hmax


def _min_scale(name: str, aspect: str) -> float:
    """Smallest window scale s that still keeps >= 1 photo pixel per output pixel (no upscaling)."""
    _, hmax = _max_window(load_photo(name).shape[:2], aspect)
    return max(0.5, ASPECTS[aspect][1] / hmax)


def _eligible(aspect: str) -> list:
    # A photo too small for the aspect would have to be upscaled into mush.
    return [n for n in PHOTOS if _min_scale(n, aspect) <= 0.8]


# -------------------------------------------------------------------------------------- planning

def _window_path(rng, name: str, aspect: str, motion: str, direction: str) -> tuple:
    """Start and end view windows (cx, cy, s) for a camera move, kept inside the photo."""
    ph, pw = load_photo(name).shape[:2]
    wmax, hmax = _max_window((ph, pw), aspect)
    s_lo = _min_scale(name, aspect)

    def bounds(s):  # centre range (fractions) that keeps a window of scale s inside
        hx, hy = s * wmax / 2 / pw, s * hmax / 2 / ph
        return (hx, 1 - hx), (hy, 1 - hy)

    if motion == "zoom":
        s_wide, s_tight = rng.uniform(0.9, 1.0), rng.uniform(s_lo, max(s_lo, 0.68))
        (x0, x1), (y0, y1) = bounds(s_tight)
        tight = (rng.uniform(x0, x1), rng.uniform(y0, y1), s_tight)
        (x0, x1), (y0, y1) = bounds(s_wide)
        # the wide end is centred as close to the tight centre as fits, so the zoom is a push
        wide = (float(np.clip(tight[0], x0, x1)), float(np.clip(tight[1], y0, y1)), s_wide)
        return (wide, tight) if direction == "in" else (tight, wide)
    if motion in ("pan", "tilt"):
        # Shrink the window until it has room to travel along the move's axis.
        s = rng.uniform(s_lo, max(s_lo, 0.78))
        while True:
            (x0, x1), (y0, y1) = bounds(s)
            span = (x1 - x0) if motion == "pan" else (y1 - y0)
            if span > 0.2 or s <= s_lo:
                break
            s = max(s_lo, s - 0.05)
        travel = rng.uniform(0.55, 0.95)
        if motion == "pan":
            cy = rng.uniform(y0, y1)
            a = rng.uniform(x0, x1 - travel * (x1 - x0))
            b = a + travel * (x1 - x0)
            p0, p1 = ((a, cy), (b, cy)) if direction == "right" else ((b, cy), (a, cy))
        else:
            cx = rng.uniform(x0, x1)
            a = rng.uniform(y0, y1 - travel * (y1 - y0))
            b = a + travel * (y1 - y0)
            p0, p1 = ((cx, b), (cx, a)) if direction == "up" else ((cx, a), (cx, b))
        return (p0[0], p0[1], s), (p1[0], p1[1], s)
    s = rng.uniform(max(s_lo, 0.6), max(s_lo, 0.95))
    (x0, x1), (y0, y1) = bounds(s)
    w = (rng.uniform(x0, x1), rng.uniform(y0, y1), s)
    return w, w


def _draw_shot(rng, aspect: str, fps: int, name: str) -> ShotPlan:
    """An ordinary shot of photo `name`: random camera move, window path, length and grade."""
    motion, direction = MOTIONS[rng.integers(len(MOTIONS))]
    w0, w1 = _window_path(rng, name, aspect, motion, direction)
    grades = ("mono", "mono", "sepia", "cool") if _is_gray(name) else ("natural", "natural", "warm", "cool")
    return ShotPlan(photo=name, motion=motion, direction=direction,
                    frames=int(round(rng.uniform(*SHOT_SECONDS) * fps)),
                    window0=tuple(map(float, w0)), window1=tuple(map(float, w1)),
                    grade=str(rng.choice(grades)))


# Photos whose ordinary shots are already dim or nearly featureless somewhere: a dark or blurred
# defect is put on the others, so the defect is unmistakable against every normal shot.
DIM_OR_FLAT = {"hubble_deep_field", "logo", "horse", "text"}


class _Deck:
    """Photos dealt from shuffled decks, so a block of videos uses the photos evenly."""

    def __init__(self, rng, pool: list):
        self.rng, self.pool, self.cards = rng, pool, []

    def deal(self, ok: Callable[[str], bool]) -> str:
        for _ in range(2):
            for i, name in enumerate(self.cards):
                if ok(name):
                    return self.cards.pop(i)
            self.cards += [self.pool[j] for j in self.rng.permutation(len(self.pool))]
        return str(self.rng.choice(self.pool))   # nothing fits: any photo beats no shot


def plan_footage(seed: int = 0, videos: int = 8, subjects: Optional[list] = None) -> list:
    """The full plan of `videos` videos (list of VideoPlan) without rendering anything.

    `subjects` restricts the photos used (keys of PHOTOS), e.g. to hold some out of training.
    """
    pool = [p for p in (subjects or PHOTOS) if p in PHOTOS]
    if not pool:
        raise ValueError(f"no known subjects in {subjects!r}; choose from {sorted(PHOTOS)}")
    plans, deck = [], None
    for v in range(videos):
        block, pos = divmod(v, BLOCK)
        brng = np.random.default_rng([seed, block, 0])
        fam = [str(a) for a in brng.permutation(list(ASPECTS))]
        # pos 0 and 1 share an aspect so the near-duplicate is a real re-crop; every family
        # appears within the block's first five videos.
        rest = fam[1:] + [str(a) for a in brng.choice(list(ASPECTS), 3)]
        rest = [rest[i] for i in brng.permutation(6)]
        aspects = [fam[0], fam[0]] + rest
        fpss = [int(f) for f in brng.permutation(list(FPS_CHOICES) + [int(x) for x in brng.choice(FPS_CHOICES, 5)])]
        if pos == 0:
            deck = _Deck(np.random.default_rng([seed, block, 3]), pool)
        aspect, fps = aspects[pos], fpss[pos]
        width, height = ASPECTS[aspect]
        rng = np.random.default_rng([seed, v, 1])
        eligible = set(_eligible(aspect))

        n = int(rng.integers(5, 7)) if pos == 0 else int(rng.integers(3, 7))
        used = set()

        def deal(extra=lambda name: True):
            name = deck.deal(lambda p: p in eligible and p not in used and extra(p))
            used.add(name)
            return name

        shots = [_draw_shot(rng, aspect, fps, deal()) for _ in range(n)]
        if pos == 0:    # the dark shot and the short shot
            i_dark, i_short = (int(i) for i in rng.choice(np.arange(1, n), 2, replace=False))
            shots[i_dark] = _draw_shot(rng, aspect, fps, deal(lambda p: p not in DIM_OR_FLAT))
            shots[i_dark].defects = ["dark"]
            shots[i_short].frames = int(round(rng.uniform(*SHORT_SECONDS) * fps))
            shots[i_short].defects = ["short"]
        if pos == 1:    # the blurred shot
            i_blur = int(rng.integers(0, n))
            shots[i_blur] = _draw_shot(rng, aspect, fps, deal(lambda p: p not in DIM_OR_FLAT))
            shots[i_blur].defects = ["blur"]
        if pos == 2:    # the frozen hold: no camera move, not even handheld sway
            i_frozen = int(rng.integers(0, n))
            w0, _ = _window_path(rng, shots[i_frozen].photo, aspect, "static", "none")
            shots[i_frozen] = replace(shots[i_frozen], motion="static", direction="none",
                                      window0=tuple(map(float, w0)), window1=tuple(map(float, w0)),
                                      defects=["static"], frames=int(round(rng.uniform(1.6, 3.0) * fps)))

        # burned-in text on some clean shots (text edges would defeat the blur/dark checks)
        clean = [i for i, s in enumerate(shots) if not s.defects]
        for i in clean:
            if rng.random() < 0.2:
                shots[i].text = str(rng.choice(TEXTS))
        if pos == 2 and not any(s.text for s in shots) and clean:
            shots[int(rng.choice(clean))].text = str(rng.choice(TEXTS))
        for s in shots:
            s.text_style = str(rng.choice(["subtitle", "title"]))

        # transitions into shots 1..n-1; the short shot is entered and left by hard cuts
        fixed = set()
        for i, s in enumerate(shots):
            if "short" in s.defects:
                fixed |= {i, i + 1}
        for i in range(1, n):
            _set_transition(rng, shots[i], "cut" if i in fixed else str(rng.choice(["cut", "cut", "dissolve", "fade"])))
        if pos == 0:    # make sure the block has a dissolve and a fade (n >= 5 leaves two free)
            free = [i for i in range(1, n) if i not in fixed]
            i_d, i_f = (int(i) for i in rng.choice(free, 2, replace=False))
            _set_transition(rng, shots[i_d], "dissolve")
            _set_transition(rng, shots[i_f], "fade")

        if pos == 1:    # near-duplicate of a clean moving shot of video pos 0 (same aspect)
            src = plans[v - 1]
            cands = [i for i, s in enumerate(src.shots) if not s.defects and s.motion != "static"] or \
                    [i for i, s in enumerate(src.shots) if not s.defects]
            j = int(rng.choice(cands))
            k = int(rng.choice([i for i, s in enumerate(shots) if not s.defects]))
            orig = src.shots[j]
            shots[k] = replace(
                orig, frames=int(round(orig.frames / src.fps * fps)), text=None, defects=[],
                transition_in=shots[k].transition_in, transition_frames=shots[k].transition_frames,
                gap_frames=shots[k].gap_frames, duplicate_of=(v - 1, j),
                window0=_recrop(orig.window0), window1=_recrop(orig.window1),
                color_shift=(1.06, 1.0, 0.93, 6.0))
        plans.append(VideoPlan(file=f"video_{v:03d}.mp4", fps=fps, aspect=aspect,
                               width=width, height=height, shots=shots))
    return plans


def _set_transition(rng, shot: ShotPlan, kind: str) -> None:
    shot.transition_in = kind
    shot.transition_frames = int(rng.integers(DISSOLVE_FRAMES[0], DISSOLVE_FRAMES[1] + 1)) \
        if kind == "dissolve" else int(rng.integers(FADE_FRAMES[0], FADE_FRAMES[1] + 1)) if kind == "fade" else 0
    shot.gap_frames = int(rng.integers(GAP_FRAMES[0], GAP_FRAMES[1] + 1)) if kind == "fade" else 0


def _recrop(w: tuple) -> tuple:
    """A slightly tighter, slightly shifted window: the near-duplicate's re-crop."""
    cx, cy, s = w
    return (cx + 0.012, cy - 0.01, s * 0.94)


# ------------------------------------------------------------------------------------- rendering

class ShotRenderer:
    """Renders the frames of one shot: `renderer(k)` -> RGB uint8 (H, W, 3) for content frame k
    of `length` content frames (the shot's owned frames plus any dissolve overlap)."""

    def __init__(self, shot: ShotPlan, aspect: str, fps: int, length: int, seed: int):
        self.shot, self.fps, self.length = shot, fps, length
        self.W, self.H = ASPECTS[aspect]
        photo = load_photo(shot.photo)
        ph, pw = photo.shape[:2]
        _, hmax = _max_window((ph, pw), aspect)
        # Pre-shrink the photo (area filter, no aliasing) so that a window of the shot's middle
        # scale maps 1:1 onto the output; the warp then only resamples by 0.7-1.4x, where
        # bilinear is clean. Pan/tilt/static windows keep one scale, so they warp at exactly 1x.
        s_mid = float(np.sqrt(shot.window0[2] * shot.window1[2]))
        self.k = min(1.0, (self.H / s_mid) / hmax)
        self.photo = cv2.resize(photo, (round(pw * self.k), round(ph * self.k)), interpolation=cv2.INTER_AREA) \
            if self.k < 1.0 else photo
        self.pw, self.ph, self.hmax = pw, ph, hmax
        self.lut = self._lut()
        # handheld sway phases, different per shot and per seed
        self.sway = np.random.default_rng([seed, 7, _stable_key(f"{shot.photo} {shot.window0}")]).uniform(0, 2 * np.pi, 4)
        self._frozen = None

    def window(self, k: int) -> tuple:
        """(cx, cy, s) at content frame k: linear in time, so the move is steady and sub-pixel."""
        u = k / max(1, self.length - 1)
        return tuple(a + (b - a) * u for a, b in zip(self.shot.window0, self.shot.window1))

    def __call__(self, k: int) -> np.ndarray:
        if "static" in self.shot.defects:
            if self._frozen is None:
                self._frozen = self._render(0)
            return self._frozen
        return self._render(k)

    def _render(self, k: int) -> np.ndarray:
        cx, cy, s = self.window(k)
        scale = self.H / (s * self.hmax * self.k)     # output pixels per working-photo pixel
        dx = dy = 0.0
        if self.shot.motion == "static" and "static" not in self.shot.defects:
            t = k / self.fps   # handheld sway: two slow sines per axis, output pixels
            a, b, c, d = self.sway
            dx = HANDHELD_PX * (np.sin(2 * np.pi * 0.31 * t + a) + 0.5 * np.sin(2 * np.pi * 0.83 * t + b))
            dy = HANDHELD_PX * (np.sin(2 * np.pi * 0.27 * t + c) + 0.5 * np.sin(2 * np.pi * 0.71 * t + d))
        # the window centre (working-photo px) lands on the frame centre, shifted by the sway
        x_c, y_c = cx * self.pw * self.k, cy * self.ph * self.k
        M = np.array([[scale, 0, self.W / 2 - scale * x_c + dx],
                      [0, scale, self.H / 2 - scale * y_c + dy]], dtype=np.float64)
        img = cv2.warpAffine(self.photo, M, (self.W, self.H), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)
        if "blur" in self.shot.defects:
            img = cv2.GaussianBlur(img, (0, 0), BLUR_SIGMA * min(self.W, self.H))
        img = cv2.LUT(img, self.lut)
        if self.shot.text:
            burn_text(img, self.shot.text, self.shot.text_style)
        return img

    def _lut(self) -> np.ndarray:
        """Per-channel tone curve (1, 256, 3): the dark defect's exposure, then the colour
        grade and the near-duplicate's colour shift. A lookup table keeps it ~free per frame."""
        x = np.arange(256, dtype=np.float64) / 255.0
        if "dark" in self.shot.defects:
            x = DARK_GAIN * x ** DARK_GAMMA
        gains = {"natural": (1.0, 1.0, 1.0), "warm": (1.08, 1.0, 0.86), "cool": (0.88, 0.98, 1.1),
                 "mono": (1.0, 1.0, 1.0), "sepia": (1.1, 0.95, 0.74)}[self.shot.grade]
        *shift, off = self.shot.color_shift
        lut = x[:, None] * np.array(gains) * np.array(shift) + off / 255.0
        return (np.clip(lut, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)[None]


def _stable_key(text: str) -> int:
    """A stable small integer for a string (Python's hash() is salted per process)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def burn_text(img: np.ndarray, text: str, style: str) -> None:
    """Draw `text` into img in place: a bottom subtitle (white, black outline) or a top title
    bar (yellow on a dark band). Sized to about 1/13 of the frame height, never wider than 90%."""
    H, W = img.shape[:2]
    font = cv2.FONT_HERSHEY_DUPLEX
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, 2)
    fs = min(H / 13 / th, 0.9 * W / tw)
    thick = max(1, int(round(fs * 1.6)))
    (tw, th), base = cv2.getTextSize(text, font, fs, thick)
    x = (W - tw) // 2
    if style == "title":
        y = int(H * 0.06) + th
        band = img[max(0, y - th - 6): y + base + 4]
        band[:] = (band.astype(np.float32) * 0.35).astype(np.uint8)
        cv2.putText(img, text, (x, y), font, fs, (255, 220, 40), thick, cv2.LINE_AA)
    else:
        y = H - int(H * 0.07)
        cv2.putText(img, text, (x, y), font, fs, (0, 0, 0), thick + 2, cv2.LINE_AA)
        cv2.putText(img, text, (x, y), font, fs, (255, 255, 255), thick, cv2.LINE_AA)


def shot_ranges(shots: list) -> list:
    """Owned (start, end) frames per shot: they tile [0, total) and meet at the boundaries."""
    out, start = [], 0
    for s in shots:
        out.append((start, start + s.frames))
        start += s.frames
    return out


def _content_ranges(shots: list, owned: list) -> list:
    """Frames each shot must render: its owned range widened into the neighbours' dissolves.
    A dissolve of L frames around boundary b runs over [b - L//2, b - L//2 + L)."""
    out = []
    for i, (a, z) in enumerate(owned):
        if shots[i].transition_in == "dissolve":
            a -= shots[i].transition_frames // 2
        if i + 1 < len(shots) and shots[i + 1].transition_in == "dissolve":
            L = shots[i + 1].transition_frames
            z += L - L // 2
        out.append((a, z))
    return out


def compose(shots: list, f: int, owned: list) -> tuple:
    """How global frame f is made: [(shot index, weight)] and an overall gain (fades).
    Weights sum to 1; gain is 1 except inside a fade (0 on the black gap)."""
    i = next(j for j, (a, z) in enumerate(owned) if a <= f < z)
    parts, gain = [(i, 1.0)], 1.0
    for j in (i, i + 1):     # the transition into shot j sits at boundary owned[j][0]
        if j >= len(shots) or j == 0:
            continue
        b, t = owned[j][0], shots[j]
        if t.transition_in == "dissolve":
            L = t.transition_frames
            k = f - (b - L // 2)
            if 0 <= k < L:
                w = (k + 1) / (L + 1)
                parts = [(j - 1, 1.0 - w), (j, w)]
        elif t.transition_in == "fade":
            F, G = t.transition_frames, t.gap_frames
            g0 = b - G // 2                      # first black frame; the gap's middle is b
            if g0 <= f < g0 + G:
                gain = 0.0
            elif g0 - F <= f < g0:
                gain = 1.0 - (f - (g0 - F) + 1) / (F + 1)
            elif g0 + G <= f < g0 + G + F:
                gain = (f - (g0 + G) + 1) / (F + 1)
    return parts, gain


def render_video(plan: VideoPlan, seed: int):
    """Yield the frames of one planned video: RGB uint8 (H, W, 3), in order."""
    owned = shot_ranges(plan.shots)
    content = _content_ranges(plan.shots, owned)
    renderers = [ShotRenderer(s, plan.aspect, plan.fps, z - a, seed) for s, (a, z) in zip(plan.shots, content)]
    total = owned[-1][1]
    for f in range(total):
        parts, gain = compose(plan.shots, f, owned)
        if gain == 0.0:
            yield np.zeros((plan.height, plan.width, 3), np.uint8)
            continue
        if len(parts) == 1 and gain == 1.0:
            i = parts[0][0]
            yield renderers[i](f - content[i][0])
            continue
        acc = np.zeros((plan.height, plan.width, 3), np.float32)
        for i, w in parts:
            acc += w * renderers[i](f - content[i][0]).astype(np.float32)
        yield (np.clip(acc * gain, 0, 255) + 0.5).astype(np.uint8)


def encode_mp4(frames, path: Path, fps: int, width: int, height: int, crf: int = 20) -> int:
    """Write RGB uint8 frames (H, W, 3) as an H.264 yuv420p mp4 with the encoder's normal GOP
    (keyframes at scene cuts and every 250 frames, B-frames; not all-intra). Returns the count.

    Frames are piped into the ffmpeg binary bundled with imageio-ffmpeg (there is no system
    ffmpeg). Not PyAV: encoding the same frames through PyAV 18.1's libx264 gave different
    bitstreams from run to run (measured here, single x264 thread, rgb24 or yuv420p input),
    while this pipe with one x264 thread and bitexact muxing is byte-identical every run."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf), "-pix_fmt", "yuv420p",
           "-threads", "1", "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
           str(path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    n = 0
    try:
        for img in frames:
            proc.stdin.write(np.ascontiguousarray(img, dtype=np.uint8).tobytes())
            n += 1
    finally:
        proc.stdin.close()
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}: {err.strip()}")
    return n


# ----------------------------------------------------------------------------- colours, captions

PALETTE = ("black", "gray", "white", "red", "orange", "brown", "beige", "yellow", "green", "teal",
           "blue", "purple", "pink")


def color_names(img: np.ndarray, max_names: int = 3, min_share: float = 0.12) -> list:
    """1-3 dominant colour names of an RGB uint8 image, most common first, from a named HSV
    palette (PALETTE); a second or third name needs at least `min_share` of the pixels."""
    return _named(color_shares(img), min_share)[:max_names]


def _named(share: np.ndarray, min_share: float) -> list:
    """PALETTE names by decreasing share: the dominant one, then every other at >= min_share."""
    order = np.argsort(-share, kind="stable")
    return [PALETTE[order[0]]] + [PALETTE[i] for i in order[1:] if share[i] >= min_share]


def colour_truth(shot: dict) -> tuple:
    """A ground-truth shot's colours for scoring a caption: the dominant first (must be named),
    then every colour it may name (`colors_allowed`; a v1 file has only `colors`)."""
    return tuple(shot.get("colors_allowed") or shot["colors"])


def color_shares(img: np.ndarray) -> np.ndarray:
    """Fraction of an RGB uint8 image's pixels that read as each PALETTE colour: (len(PALETTE),)."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).reshape(-1, 3)
    h = hsv[:, 0].astype(np.float32) * 2.0                 # degrees
    s, v = hsv[:, 1] / 255.0, hsv[:, 2] / 255.0
    P = {n: i for i, n in enumerate(PALETTE)}
    label = np.full(h.shape, P["gray"], np.int64)
    chroma = (s > 0.2) & (s * v > 0.1)    # too little chroma reads as black/grey/white, whatever the hue
    lo = 0
    for hi, name in [(15, "red"), (40, "orange"), (68, "yellow"), (165, "green"), (200, "teal"),
                     (255, "blue"), (290, "purple"), (340, "pink"), (361, "red")]:
        label[chroma & (h >= lo) & (h < hi)] = P[name]
        lo = hi
    warm = chroma & (h >= 10) & (h < 50)
    label[warm & (v < 0.6)] = P["brown"]
    label[warm & (v >= 0.6) & (s < 0.45)] = P["beige"]
    label[(label == P["pink"]) & (v < 0.45)] = P["purple"]
    label[~chroma & (v > 0.8)] = P["white"]
    label[v < 0.18] = P["black"]
    return np.bincount(label, minlength=len(PALETTE)) / label.size


def yuv420_roundtrip(img: np.ndarray) -> np.ndarray:
    """An RGB frame as a yuv420p encode stores it (chroma averaged over 2x2 blocks, 8-bit
    planes), back in RGB: colours near a hue or saturation boundary change name this way."""
    h, w = img.shape[:2]
    img = img[: h - h % 2, : w - w % 2]
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2YUV_I420), cv2.COLOR_YUV2RGB_I420)


def _join(words: list) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _speed(shot: ShotPlan, plan: VideoPlan) -> str:
    """slowly | steadily | quickly, from the move's on-screen speed."""
    seconds = shot.frames / plan.fps
    if shot.motion in ("pan", "tilt"):
        ph, pw = load_photo(shot.photo).shape[:2]
        wmax, hmax = _max_window((ph, pw), plan.aspect)
        s = shot.window0[2]
        if shot.motion == "pan":
            px = abs(shot.window1[0] - shot.window0[0]) * pw / (s * wmax) * plan.width
        else:
            px = abs(shot.window1[1] - shot.window0[1]) * ph / (s * hmax) * plan.height
        rate = px / seconds / min(plan.width, plan.height)      # short sides per second
        return "slowly" if rate < 0.3 else "steadily" if rate < 0.7 else "quickly"
    if shot.motion == "zoom":
        ratio = max(shot.window0[2], shot.window1[2]) / min(shot.window0[2], shot.window1[2])
        rate = ratio ** (1 / seconds)
        return "slowly" if rate < 1.1 else "steadily" if rate < 1.2 else "quickly"
    return ""


MOVE_SHORT = {("pan", "left"): "pans left", ("pan", "right"): "pans right", ("tilt", "up"): "tilts up",
              ("tilt", "down"): "tilts down", ("zoom", "in"): "zooms in", ("zoom", "out"): "zooms out",
              ("static", "none"): "holds still"}
MOVE_NOUN = {("pan", "left"): "pan to the left", ("pan", "right"): "pan to the right",
             ("tilt", "up"): "upward tilt", ("tilt", "down"): "downward tilt",
             ("zoom", "in"): "zoom in", ("zoom", "out"): "zoom out", ("static", "none"): "static shot"}
MOVE_EFFECT = {("pan", "left"): "sweeping across the scene from right to left",
               ("pan", "right"): "sweeping across the scene from left to right",
               ("tilt", "up"): "rising from the lower part of the picture toward the top",
               ("tilt", "down"): "travelling from the top of the picture down toward the bottom",
               ("zoom", "in"): "pushing closer so that details grow larger in the frame",
               ("zoom", "out"): "pulling back to reveal more of the surroundings"}
# The caption phrases of each move and of the same move played backwards, which the captioner's
# time-reversal augmentation exchanges (captioner.train.swap_phrases). A zoom's preposition
# changes with it ("zooms in on" / "zooms out from", see caption_shot)
OPPOSITE_MOVES = {("zoom", "in"): ("zoom", "out"), ("tilt", "up"): ("tilt", "down"), ("pan", "left"): ("pan", "right")}
REVERSED_MOVES = [("zooms in on", "zooms out from"), ("zoom in on", "zoom out from")] + \
    [(table[a], table[b]) for table in (MOVE_SHORT, MOVE_NOUN, MOVE_EFFECT) for a, b in OPPOSITE_MOVES.items()]
GRADE_WORDS = {"natural": "natural, true-to-life colour", "warm": "a warm, golden colour grade",
               "cool": "a cool, bluish colour grade", "mono": "black-and-white tones",
               "sepia": "a brownish sepia tint"}
ASPECT_WORDS = {"16:9": "widescreen 16:9", "9:16": "vertical 9:16", "1:1": "square 1:1", "4:3": "classic 4:3"}


def caption_shot(shot: ShotPlan, plan: VideoPlan, colors: list, rng) -> tuple:
    """(caption_short <= 15 words, caption_dense 60-120 words) for one shot, from varied templates.
    Both name the subject, the dominant colours, the camera move with its direction and any
    burned-in text; the dense one adds setting, lighting, style, pacing and any defect."""
    p = PHOTOS[shot.photo]
    key = (shot.motion, shot.direction)
    frozen = "static" in shot.defects
    cols = _join(colors)
    speed = _speed(shot, plan)
    seconds = shot.frames / plan.fps
    lighting = "dim, murky low light" if "dark" in shot.defects else p.lighting
    adj = ("Blurry " if "blur" in shot.defects else "Dark " if "dark" in shot.defects
           else "Brief " if "short" in shot.defects else "")
    tail = (", out of focus" if "blur" in shot.defects else ", very dark" if "dark" in shot.defects
            else ", brief" if "short" in shot.defects else "")
    if frozen:
        move, verb, prep = "frozen still frame", "stays frozen", "of"
    elif shot.motion == "static":
        move, verb, prep = "handheld static shot", "holds almost still", "of"
    else:
        move, verb = MOVE_NOUN[key], MOVE_SHORT[key]
        prep = {"pan": "across", "tilt": "over", "zoom": "on" if shot.direction == "in" else "from"}[shot.motion]
    text_bit = f', text "{shot.text}"' if shot.text else ""

    def short_options(subj):
        return [f"{adj}{move} {prep} {subj} in {cols} tones{text_bit}.",
                f"{_cap(subj)}, {cols}; the camera {verb}{tail}{text_bit}.",
                f"{adj}{cols} shot: the camera {verb} over {subj}{text_bit}.",
                f"{_cap(subj)} as the camera {verb}, mostly {cols}{tail}{text_bit}.",
                f"Camera {verb} {prep if shot.motion != 'static' else 'on'} {subj}{tail}; {cols}{text_bit}."]

    short = None
    for subj in (p.subject, p.name):
        opts = [_cap(o) for o in short_options(subj)]
        first = int(rng.integers(len(opts)))
        fitting = [o for o in opts[first:] + opts[:first] if len(o.split()) <= 15]
        if fitting:
            short = fitting[0]
            break
    if short is None:       # only a very long text overlay can get here
        short = " ".join(f"{_cap(p.name)}: camera {verb}, {cols}{text_bit}".split()[:15])

    dominate = "dominates" if len(colors) == 1 else "dominate"
    opening = [f"{_cap(p.style)} of {p.subject} {p.setting}, brought to life as a short video.",
               f"This clip shows {p.subject} {p.setting}.",
               f"{_cap(p.subject)} appears {p.setting}, in {p.style}.",
               f"We see {p.subject} {p.setting}; it looks like {p.style}.",
               f"The subject is {p.subject}, {p.setting}."]
    if frozen:
        camera = ["The picture is completely frozen: nothing moves at all for the whole shot.",
                  "It is a frozen hold, with no camera movement and no change from frame to frame."]
    elif shot.motion == "static":
        camera = ["The camera is handheld and nearly static, drifting only slightly.",
                  "A static, handheld framing with a faint sway of the camera.",
                  "The camera stays put, with only the gentle wobble of a handheld shot."]
    else:
        eff = MOVE_EFFECT[key]
        camera = [f"The camera {speed} {verb}, {eff}.",
                  f"A {'gentle' if speed == 'slowly' else 'smooth'} {move} moves {speed}, {eff}.",
                  f"As the shot plays, the camera {verb} {speed}, {eff}."]
    colour = [f"The palette is dominated by {cols}, under {lighting}.",
              f"{_cap(cols)} {dominate} the frame, lit by {lighting}.",
              f"Colours are mostly {cols}; the lighting is {lighting}."]
    style = [f"The image has {GRADE_WORDS[shot.grade]} and a photographic, Ken Burns look.",
             f"It is rendered with {GRADE_WORDS[shot.grade]}, like a still photograph brought to life.",
             f"The look is photographic, with {GRADE_WORDS[shot.grade]}."]
    where = "along the bottom as a subtitle" if shot.text_style == "subtitle" else "in a dark title bar at the top"
    hue = "white" if shot.text_style == "subtitle" else "yellow"
    text = [f'Burned-in {hue} text reading "{shot.text}" sits {where}.',
            f'The words "{shot.text}" are overlaid in {hue} capital letters {where}.',
            f'On-screen text says "{shot.text}", set {where}.'] if shot.text else []
    defect = []
    if "blur" in shot.defects:
        defect.append("The whole shot is badly out of focus, so edges and textures are soft and smeared.")
    if "dark" in shot.defects:
        defect.append("It is severely underexposed and very dark, with most detail lost in shadow.")
    if "short" in shot.defects:
        defect.append("The shot is very brief, lasting less than a second.")
    pace_word = ("quick, fleeting" if seconds < 1.0 else "brisk" if seconds < 2.2
                 else "measured" if seconds < 3.5 else "slow, unhurried")
    pacing = [f"The pacing is {pace_word}, about {seconds:.1f} seconds long.",
              f"It lasts roughly {seconds:.1f} seconds, giving a {pace_word} rhythm.",
              f"At about {seconds:.1f} seconds, the pace feels {pace_word}."]
    framing = [f"It is framed in a {ASPECT_WORDS[plan.aspect]} format.",
               f"The frame is {ASPECT_WORDS[plan.aspect]}."]

    def pick(options):
        return options[int(rng.integers(len(options)))]

    middle = [pick(colour), pick(style), p.details] + ([pick(text)] if text else []) + defect
    middle = [middle[i] for i in rng.permutation(len(middle))]
    core = [pick(opening), pick(camera)] + middle
    sentences = core + [pick(pacing), pick(framing)]
    # keep to 60-120 words: drop the optional pacing/framing sentences while too long
    while len(" ".join(sentences).split()) > 120 and len(sentences) > len(core):
        sentences.pop()
    return _cap(short), " ".join(sentences)


# ------------------------------------------------------------------------------------ the corpus

COLOR_NAMED, COLOR_ALLOWED = 0.12, 0.06  # share of a shot's pixels to be named / to be not wrong


def _shot_colors(plan: VideoPlan, i: int, seed: int) -> tuple:
    """Colours of shot i as its encoded frames show them: (named, allowed).

    named: the dominant colour and up to two more covering >= COLOR_NAMED of the pixels (what the
    captions say); allowed: every colour covering >= COLOR_ALLOWED (what a caption may say without
    being wrong). Measured over 8 frames across the shot after a yuv420p round trip, since a
    captioner only ever sees decoded video: on pre-encode pixels and 3 frames, ~20% of frames named
    colours differently once encoded (a grey read as blue at the chroma threshold, red/orange order).
    The margin between the two thresholds keeps a colour near one threshold from making a correct
    caption wrong."""
    shots = plan.shots
    owned = shot_ranges(shots)
    content = _content_ranges(shots, owned)
    a, z = content[i]
    r = ShotRenderer(shots[i], plan.aspect, plan.fps, z - a, seed)
    n = owned[i][1] - owned[i][0]
    frames = [yuv420_roundtrip(r(owned[i][0] - a + int(q * (n - 1)))) for q in (np.arange(8) + 0.5) / 8]
    share = color_shares(np.concatenate(frames, axis=0))
    named = _named(share, COLOR_NAMED)[:3]
    return named, named + [c for c in _named(share, COLOR_ALLOWED) if c not in named]


def ground_truth(plans: list, seed: int) -> dict:
    """The ground-truth document for a plan (see module docstring), without encoding video."""
    videos = []
    for v, plan in enumerate(plans):
        owned = shot_ranges(plan.shots)
        shots = []
        for i, (shot, (a, z)) in enumerate(zip(plan.shots, owned)):
            colors, allowed = _shot_colors(plan, i, seed)
            short, dense = caption_shot(shot, plan, colors, np.random.default_rng([seed, v, i, 2]))
            dup = None
            if shot.duplicate_of is not None:
                dv, ds = shot.duplicate_of
                dup = {"file": plans[dv].file, "shot": ds}
            shots.append({
                "index": i, "start_frame": a, "end_frame": z,
                "transition_in": shot.transition_in,
                "subject": shot.photo, "scene": PHOTOS[shot.photo].scene,
                "camera_motion": shot.motion, "direction": shot.direction,
                "colors": colors, "colors_allowed": allowed, "text": shot.text, "defects": list(shot.defects),
                "duplicate_of": dup, "caption_short": short, "caption_dense": dense})
        videos.append({"file": plan.file, "fps": plan.fps, "width": plan.width, "height": plan.height,
                       "num_frames": owned[-1][1], "boundaries": [a for a, _ in owned[1:]],
                       "shots": shots})
    return {"seed": seed, "generator": GENERATOR, "videos": videos}


def generate_footage(out_dir, seed: int = 0, videos: int = 8,
                     progress: Optional[Callable[[int, int], None]] = None,
                     subjects: Optional[list] = None) -> Path:
    """Render `videos` H.264 mp4 files and `ground_truth.json` into out_dir; return the json path.

    `progress(done, total)` is called after each video. The same seed and count give
    byte-identical files; a larger count keeps the smaller count's videos as its prefix.
    `subjects` restricts the photos used (keys of PHOTOS), for held-out splits.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_footage(seed, videos, subjects)
    _remove_stale_videos(out, {p.file for p in plans})
    for v, plan in enumerate(plans):
        encode_mp4(render_video(plan, seed), out / plan.file, plan.fps, plan.width, plan.height)
        if progress is not None:
            progress(v + 1, len(plans))
    gt_path = out / "ground_truth.json"
    gt_path.write_text(json.dumps(ground_truth(plans, seed), indent=1) + "\n")
    return gt_path


def _remove_stale_videos(out: Path, keep: set) -> None:
    """Delete the videos an earlier run's ground_truth.json in `out` listed that this run will not
    write: left beside the new truth, curating the dir took them in with no captions or truth.
    Files it did not list (the user's own) are never touched."""
    try:
        old = json.loads((out / "ground_truth.json").read_text())
        ours = str(old.get("generator", "")).startswith("spacetime.synthetic")  # any version of this generator
        listed = {v["file"] for v in old["videos"]} if ours else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    for name in listed - keep:
        if Path(name).name == name:  # a bare file name, as plan_footage writes: nothing outside `out`
            (out / name).unlink(missing_ok=True)


def ground_truth_captions(gt_path) -> list:
    """Caption rows for `spacetime curate --captions FILE`: one dict per ground-truth shot,
    {"source": absolute video path, "start_frame", "end_frame" (0-based, end exclusive),
    "caption_short", "caption_dense"}."""
    gt_path = Path(gt_path)
    gt = json.loads(gt_path.read_text())
    rows = []
    for v in gt["videos"]:
        source = str((gt_path.parent / v["file"]).resolve())
        for s in v["shots"]:
            rows.append({"source": source, "start_frame": s["start_frame"], "end_frame": s["end_frame"],
                         "caption_short": s["caption_short"], "caption_dense": s["caption_dense"]})
    return rows


def write_captions_file(gt_path, out_path) -> Path:
    """Write ground_truth_captions(gt_path) as a JSON list to out_path; return out_path."""
    out_path = Path(out_path)
    out_path.write_text(json.dumps(ground_truth_captions(gt_path), indent=1) + "\n")
    return out_path
