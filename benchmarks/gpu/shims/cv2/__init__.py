"""GPU-kit shim for OpenCV (opencv-python-headless, ~50 MB). nerfstudio imports cv2 at module level in
cameras.py, data_utils.py and full_images_datamanager.py; the kit's path (the built-in scene: pinhole cameras
without distortion, PNG images read by PIL) calls none of it: cv2 undistorts images of distorted or fisheye
cameras, reads depth maps and encodes JPEGs for the viewer. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("cv2", "only pinhole cameras without distortion and no depth maps work in the kit")
