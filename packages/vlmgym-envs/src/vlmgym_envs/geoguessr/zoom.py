"""`geoguessr_zoom`: OSV-5M GeoGuessr where the model sees a small street view and may zoom.

The first view is the photo downscaled to `view_side` pixels on its longer side; the
`zoom(x0, y0, x1, y1)` tool (`vlmgym_envs.zoom`, coordinates as fractions of the size)
returns any region at the resolution the dataset image was read at (`max_image_side` and
the other `OSV5MEnv` image limits), so signs, plates and plants become readable. At most
`max_calls` calls per episode; the final answer is scored exactly as `osv5m` scores it
(same reward, curriculum and metrics), minus `call_cost` per call.
"""

from __future__ import annotations

import os
from typing import Any

from vlmgym_envs.geoguessr.env import GEO_PROMPT, OSV5MEnv
from vlmgym_envs.tool_env import DEFAULT_SYSTEM, ToolEnv
from vlmgym_envs.zoom import zoom_tool

GEO_ZOOM_PROMPT = (
    GEO_PROMPT + "\n\nThe photo is shown small. Before answering you may call the zoom tool to "
    "see any region of it at full resolution (signs, licence plates, road markings, plants)."
)


class GeoZoomEnv(ToolEnv):
    """`geoguessr_zoom` (see the module docstring).

    data_dir, split and `**osv5m_kwargs` (reward, curriculum, stage, max_image_side...): as
    `OSV5MEnv`. view_side: the longer side of the first view. max_calls, call_cost,
    timeout_s, system_prompt: as `ToolEnv`. zoom_max_side: downscale zoomed regions longer
    than this (None: never).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        split: str = "test",
        *,
        view_side: int = 256,
        max_calls: int = 3,
        call_cost: float = 0.0,
        timeout_s: float = 10.0,
        zoom_max_side: int | None = None,
        system_prompt: str = DEFAULT_SYSTEM,
        prompt: str = GEO_ZOOM_PROMPT,
        **osv5m_kwargs: Any,
    ) -> None:
        inner = OSV5MEnv(data_dir, split, prompt=prompt, **osv5m_kwargs)
        super().__init__(
            inner,
            [zoom_tool(max_side=zoom_max_side)],
            max_calls=max_calls,
            timeout_s=timeout_s,
            call_cost=call_cost,
            first_view_side=view_side,
            system_prompt=system_prompt,
        )
