"""Small randomly initialised models saved to folders, for tests to load through the real loading code.

Each builder writes what ``mlfarm models fetch`` would put in ``MLFARM_WEIGHTS_DIR`` (the same file
layout) from a configuration a few megabytes in size, so a test runs the plugin's real ``load()`` on
the CPU in seconds. The weights are random: outputs are meaningless, shapes and plumbing are real.
"""

from __future__ import annotations

from pathlib import Path


def sam2_video(folder: Path, image_size: int = 64, seed: int = 0) -> Path:
    """A 1.2 M-parameter SAM 2 video model (Hugging Face layout) and its processor in ``folder``.

    Sizes below the real models' are bounded by SAM 2 itself: the memory encoder's output is 64 wide,
    the other widths a multiple of 64 above it, and ``image_size`` a multiple of 32.
    """
    import torch
    from transformers import (
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2VideoConfig,
        Sam2VideoModel,
        Sam2VideoProcessor,
        Sam2VideoVideoProcessor,
        Sam2VisionConfig,
    )

    s = [image_size // 4, image_size // 8, image_size // 16]
    width = 128
    backbone = Sam2HieraDetConfig(
        hidden_size=16, embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 2, 2],
        blocks_per_stage=[1, 1, 2, 1], global_attention_blocks=[3], window_size_per_stage=[4, 4, 4, 2],
        window_positional_embedding_background_size=[4, 4], image_size=[image_size, image_size])
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[128, 64, 32, 16],
                              backbone_feature_sizes=[[v, v] for v in s], fpn_hidden_size=width)
    config = Sam2VideoConfig(
        vision_config=vision, image_size=image_size,
        prompt_encoder_config=dict(hidden_size=width, image_size=image_size, patch_size=16),
        mask_decoder_config=dict(hidden_size=width, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=width),
        num_maskmem=7, memory_attention_hidden_size=width, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_attention_rope_feat_sizes=[s[2], s[2]],
        memory_encoder_hidden_size=width, memory_encoder_output_channels=64, mask_downsampler_embed_dim=width,
        memory_fuser_embed_dim=width, memory_fuser_intermediate_dim=64, memory_fuser_num_layers=1)
    torch.manual_seed(seed)
    Sam2VideoModel(config).eval().save_pretrained(str(folder))
    processor = Sam2VideoProcessor(
        image_processor=Sam2ImageProcessor(size={"height": image_size, "width": image_size},
                                           mask_size={"height": image_size // 4, "width": image_size // 4}),
        video_processor=Sam2VideoVideoProcessor(size={"height": image_size, "width": image_size}))
    processor.save_pretrained(str(folder))
    return folder


def depth_anything(folder: Path, size: int = 56, seed: int = 0) -> Path:
    """A 121 k-parameter Depth Anything (V2 layout: DINOv2 backbone, DPT head) and its image processor
    in ``folder``; ``size`` is the processor's short side (the real models use 518)."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor
    from transformers.image_utils import PILImageResampling

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                            image_size=70, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=32,
                                 reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type="relative")
    torch.manual_seed(seed)
    DepthAnythingForDepthEstimation(config).eval().save_pretrained(str(folder))
    DPTImageProcessor(do_resize=True, size={"height": size, "width": size}, keep_aspect_ratio=True,
                      ensure_multiple_of=14, resample=PILImageResampling.BICUBIC, do_rescale=True, do_normalize=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      do_pad=False).save_pretrained(str(folder))
    return folder
