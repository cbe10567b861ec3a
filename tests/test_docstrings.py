"""Every public function, class and method of jaxqlora and pallas_kernels has a docstring."""

import importlib
import inspect
import pkgutil

import jaxqlora
import pallas_kernels


def _public_objects():
    for pkg in (jaxqlora, pallas_kernels):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            mod = importlib.import_module(info.name)
            for name, obj in vars(mod).items():
                if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    yield f"{mod.__name__}.{name}", obj
                    if inspect.isclass(obj):
                        for attr, member in vars(obj).items():
                            if isinstance(member, (classmethod, staticmethod)):
                                member = member.__func__
                            if not attr.startswith("_") and inspect.isfunction(member):
                                yield f"{mod.__name__}.{name}.{attr}", member


def test_public_names_have_docstrings():
    objects = dict(_public_objects())
    assert len(objects) > 80  # the walk found the library
    missing = [name for name, obj in objects.items() if not (obj.__doc__ or "").strip()]
    assert not missing, missing
