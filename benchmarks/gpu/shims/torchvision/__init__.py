"""GPU-kit shim for torchvision (its wheels are built for one torch version; none matches the GPU machine's torch
2.11 + CUDA 13, and it is large). nerfstudio's base_pipeline imports `torchvision.utils` at module level, to save
rendered images when `ns-eval --render-output-path` is given (the kit does not give it); the viewer imports
`torchvision.transforms.functional` lazily. LPIPS (torchmetrics) would need torchvision's AlexNet and its
downloaded weights: the plugin's models build LPIPS lazily and omit it when it cannot be built, so the kit's
metrics are PSNR and SSIM. This shim has no dist-info, so torchmetrics and timm see no torchvision. Submodules
`utils`, `transforms` and `transforms.functional` are shims too. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("torchvision", "ns-eval without --render-output-path, metrics without LPIPS")
