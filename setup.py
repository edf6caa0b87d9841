"""Builds vae_fast._C with CMake (the pybind11 cmake_example pattern); nothing else lives here."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: str = "") -> None:
        super().__init__(name, sources=[])
        self.source_dir = os.fspath(Path(source_dir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        ext_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = os.environ.get("VAE_FAST_BUILD_TYPE", "Release")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
        ]
        if os.environ.get("VAE_FAST_SANITIZE") == "1":
            cmake_args.append("-DVAE_FAST_SANITIZE=ON")
        cmake_args += os.environ.get("CMAKE_ARGS", "").split()  # e.g. -DVAE_FAST_LINK_OPENMP=ON
        try:
            import pybind11

            cmake_args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", ext.source_dir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_temp, check=True)


setup(ext_modules=[CMakeExtension("vae_fast._C")], cmdclass={"build_ext": CMakeBuild})
