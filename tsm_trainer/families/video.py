"""The text-to-video 3D UNet."""

from __future__ import annotations

import torch

from tsm_trainer.families.base import Components, FamilySpec, FolderLayout
from tsm_trainer.families.sd import StableDiffusionFamily

# VideoCrafter2 in the paper: k and v of spatial and temporal attention, OpenCLIP out_proj.
VIDEO = FamilySpec(
    "video",
    {"*": ("to_k", "to_v")},
    {"clip": ("out_proj",)},
    "ddpm",
    "t2v_unet3d",
    "text-to-video-unet3d/lora",
    resolution=256,
    denoiser_classes=("UNet3DConditionModel",),
    metadata_needles=("video", "t2v"),
)


class TextToVideoFamily(StableDiffusionFamily):
    """Text-to-video 3D UNet (diffusers ``UNet3DConditionModel``, ModelScope/VideoCrafter style):
    frames encoded by the image VAE one by one, one CLIP encoder, DDPM noise on (B, C, F, h, w)."""

    specs = (VIDEO,)
    names = ("video",)

    reads_single_files = False

    def folder_layout(self) -> FolderLayout:
        from diffusers import DDPMScheduler, UNet3DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        return FolderLayout(
            (UNet3DConditionModel, "unet"),
            ((CLIPTextModel, "text_encoder"),),
            ((CLIPTokenizer, "tokenizer"),),
            DDPMScheduler,
        )

    def encode_images(
        self, c: Components, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, F, 3, H, W) clips in [-1, 1] -> scaled latents (B, 4, F, H/f, W/f)."""
        if pixels.dim() != 5:
            raise ValueError(
                f"the video family trains on clips (B, F, 3, H, W); got a batch of shape "
                f"{tuple(pixels.shape)} (set video_frames in the dataset config)"
            )
        b, f = pixels.shape[:2]
        latents = super().encode_images(c, pixels.flatten(0, 1), generator)
        return latents.unflatten(0, (b, f)).transpose(1, 2)

    def sample(self, c: Components, prompts: list[str], steps: int, guidance: float, size: int, seed: int) -> list:
        """The first frame of each prompt's clip (a grid of clips would not fit one image)."""
        from diffusers import DDIMScheduler, TextToVideoSDPipeline

        pipe = TextToVideoSDPipeline(
            vae=c.vae,
            text_encoder=c.text_encoders[0],
            tokenizer=c.tokenizers[0],
            unet=c.denoiser,
            scheduler=DDIMScheduler.from_config(c.noise_scheduler.config),
        )
        pipe.set_progress_bar_config(disable=True)
        images = []
        with torch.no_grad():
            for prompt in prompts:
                frames = pipe(
                    prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=size,
                    width=size,
                    num_frames=2,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="pil",
                ).frames
                images.append(frames[0][0])
        return images
