"""setuptools' build, plus one file: the wheel also carries sglang_fx_cpu_host.pth at its top
level, so that pip puts it in site-packages, where Python runs it at start-up (what it does,
and why it is a no-op where not needed: sglang_fx/cpu_host.py). Everything else is declared in
pyproject.toml. Editable installs skip it: `sglang-fx setup-cpu-host` writes the same file."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path("sglang_fx") / "sglang_fx_cpu_host.pth"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        extra = [] if self.editable_mode else [str(Path(self.build_lib) / PTH.name)]
        return super().get_outputs(include_bytecode) + extra


setup(cmdclass={"build_py": BuildWithPth})
