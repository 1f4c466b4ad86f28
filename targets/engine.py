"""The engine runtime: an engine loaded from its manifest, and the one binding that runs it.

`load_engine(dir)` builds the ONNX Runtime session from the manifest's build config alone. An
`Engine` runs on host arrays (`run`), or hands out a `Binding` over buffers from an allocator
(targets/buffers.py): host numpy arrays, ONNX Runtime device buffers, or torch CUDA tensors.

The binding is the one place that knows about fixed buffers and CUDA graphs. It binds every input
and output by address to a buffer allocated once per shape and refills the inputs in place, so
addresses stay fixed as CUDA graph replay requires; it pads inputs to the engine's alignment and
crops outputs back; and for a new shape of a CUDA-graph engine it runs the capture runs at once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from kiln.targets.align import CropBox
from kiln.targets.buffers import Buffers, HostBuffers, OrtDeviceBuffers, numpy_type
from kiln.targets.manifest import DIRECTORY_OPTIONS, BuildConfig, EngineError, for_profile, read_manifest
from kiln.targets.profile import DimRange, Profile, TensorSpec, derived_mismatch, dim_size, profile_label

ort.set_default_logger_severity(3)  # errors only: kiln reports what matters itself
CUDA_GRAPH_RUNS = 3  # ONNX Runtime captures its CUDA graph on the third run of a shape
ANY_SIZE = 2**31 - 1


THREADS_VARIABLE = "KILN_THREADS"


def session_options(level: ort.GraphOptimizationLevel, log_level: int = 3) -> ort.SessionOptions:
    """Options for every ONNX Runtime session kiln makes. $KILN_THREADS caps each session's threads
    (ONNX Runtime's default is one per core), for several kiln processes sharing a machine."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = log_level
    threads = thread_cap()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def thread_cap() -> int | None:
    """$KILN_THREADS as a number, None when unset."""
    threads = os.environ.get(THREADS_VARIABLE)
    if threads is None:
        return None
    if not threads.isdigit() or int(threads) < 1:
        raise EngineError(f"{THREADS_VARIABLE}={threads!r} is not a positive whole number",
                          hint=f"set {THREADS_VARIABLE} to the threads each ONNX Runtime session may use, or unset it")  # fmt: skip
    return int(threads)


def session_specs(args) -> tuple[TensorSpec, ...]:
    """TensorSpecs of an ONNX Runtime session's inputs or outputs."""
    return tuple(
        TensorSpec(a.name, numpy_type(a.type), tuple(d if isinstance(d, int) else str(d) for d in a.shape)) for a in args
    )


def preload_cuda() -> None:
    """Load the CUDA and cuDNN libraries that torch's packages ship, before a CUDA session is made."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def check_machine(config: BuildConfig, engine_dir: Path) -> None:
    """Refuse a GPU engine built for another GPU or a newer runtime, saying what differs."""
    from kiln.targets.gpu import fingerprint
    from kiln.targets.portability import differences

    here = {**fingerprint(), "onnxruntime": ort.__version__}
    if "tensorrt" in config.built_with:
        try:
            import tensorrt

            here["tensorrt"] = tensorrt.__version__
        except ImportError:
            pass  # differences() says it is missing
    # Every GPU target but the generic cuda one is for one GPU model (and TensorRT plans always are).
    found = differences(config.built_with, here, one_model=config.target != "cuda")
    if found:
        raise EngineError(f"the engine in {engine_dir} does not run on this machine: {'; '.join(found)}",
                          hint="build it here: `kiln optimize MODEL -o OUTDIR --target auto`")  # fmt: skip


def _check_deferred(config: BuildConfig, engine_dir: Path, missing: list[str]) -> None:
    """A deferred engine recorded no machine: it loads only where its target runs (its GPU model for a
    per-GPU target), and is finished there by `kiln verify`."""
    from kiln.targets import TARGETS

    target = TARGETS.get(config.target)
    why = target.other_gpu() if target is not None else None
    why = why or (f"onnxruntime {ort.__version__} here lacks {', '.join(missing)}" if missing else None)
    if why:
        raise EngineError(f"the engine in {engine_dir} was built for target {config.target!r} without its GPU, and does not run here: {why}",
                          hint=f"`kiln verify {engine_dir.parent}` on a machine where {config.target} runs")  # fmt: skip


def load_engine(engine_dir: Path, cuda_stream: int | None = None) -> Engine:
    """The engine that a target's build wrote into engine_dir, with the session settings its manifest
    records; a CUDA engine runs on cuda_stream (a cudaStream_t) if given."""
    config = read_manifest(engine_dir)
    model = engine_dir / config.model
    if not model.is_file():
        raise EngineError(f"engine model {model} is missing", hint="rebuild the engine with `kiln optimize`")
    if config.device == "cuda":
        check_machine(config, engine_dir)
    missing = [p for p in config.providers if p not in ort.get_available_providers()]
    if not config.verified:
        _check_deferred(config, engine_dir, missing)
    if missing:
        raise EngineError(
            f"the engine in {engine_dir} was built for target {config.target!r}, which needs {', '.join(missing)}; "
            f"onnxruntime {ort.__version__} here lacks it",
            hint="run it where that target is available (`kiln targets`), or build it for this machine's target",
        )
    if config.device == "cuda":
        preload_cuda()
    if not config.profiles:
        return Engine(_session(config, model, engine_dir, cuda_stream), config, engine_dir)
    sessions, members = {}, []
    for index, profile in enumerate(config.profiles):
        member = config.member(index)
        # Dynamic profiles run in one session; a static one in its own, its dims fixed for ONNX Runtime.
        key = repr((profile.shapes(profile.sizes("opt")) if profile.is_static() else None, member.provider_options))
        if key not in sessions:
            sessions[key] = _session(member, model, engine_dir, cuda_stream, fixed=profile.is_static())
        session = sessions[key]
        if profile.is_static():  # its dims fixed, ONNX Runtime infers its outputs' sizes
            outputs = session_specs(session.get_outputs())
            if all(isinstance(d, int) for spec in outputs for d in spec.shape):
                member = dataclasses.replace(member, outputs=outputs)
            elif member.cuda_graph:  # a CUDA graph needs its outputs bound before its first run
                member = dataclasses.replace(member, cuda_graph=False, provider_options=for_profile(member.provider_options, profile))
                session = _session(member, model, engine_dir, cuda_stream, fixed=True)
        members.append(Engine(session, member, engine_dir))
    return EngineSet(members, config, engine_dir)


def _session(config: BuildConfig, model: Path, engine_dir: Path, cuda_stream: int | None, fixed: bool = False) -> ort.InferenceSession:
    """The session of one profile; fixed: the profile's dims given to ONNX Runtime as sizes, so that its
    graph optimizer folds the shape arithmetic of that one shape."""
    for key in DIRECTORY_OPTIONS:  # a profile's own engine cache folder (EngineSet), made on first load
        if key in config.provider_options:
            (engine_dir / config.provider_options[key]).mkdir(parents=True, exist_ok=True)
    # A static profile's dims are given at load (below), which the optimizer then folds.
    skip = config.optimized_at_build and not fixed
    options = session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL if skip else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if fixed:
        sizes = config.profile.sizes("opt")
        for dim in dict.fromkeys(d for spec in config.profile.inputs for d in spec.shape if isinstance(d, str)):
            options.add_free_dimension_override_by_name(dim, dim_size(dim, sizes))
    try:
        return ort.InferenceSession(os.fspath(model), options, providers=config.session_providers(cuda_stream, engine_dir),
                                    **config.session_kwargs())  # fmt: skip
    except Exception as exc:  # a damaged model file: ONNX Runtime says InvalidProtobuf or the like
        raise EngineError(f"ONNX Runtime cannot load {model}: {str(exc).splitlines()[0]}",
                          hint="the engine is damaged; rebuild it with `kiln optimize`") from None  # fmt: skip


class Engine:
    """A loaded engine: its session, and the build config it was loaded from."""

    def __init__(self, session: ort.InferenceSession, config: BuildConfig, directory: Path | None = None):
        self.session, self.config = session, config
        self.directory = directory  # where it was loaded from, for messages
        self.inputs, self.outputs = config.inputs, config.outputs
        self.profile: Profile = config.profile
        self.alignment = config.alignment
        self._host: Binding | None = None
        self._bindings = 0

    @classmethod
    def from_session(cls, session: ort.InferenceSession, device: str = "cpu") -> Engine:
        """An engine over a session kiln did not build (a benchmark's baseline): its own inputs and
        outputs, any size of its dynamic dims, no alignment."""
        inputs, outputs = session_specs(session.get_inputs()), session_specs(session.get_outputs())
        dims = {d: DimRange(1, 1, ANY_SIZE) for spec in inputs for d in spec.dynamic_dims}
        config = BuildConfig(
            target="onnxruntime", model="", device=device, providers=tuple(session.get_providers()),
            provider_options={}, precision="as built", tf32=False, cuda_graph=False,
            profile=Profile(inputs, dims), inputs=inputs, outputs=outputs,
        )  # fmt: skip
        return cls(session, config)

    @property
    def device_resident(self) -> bool:
        """Whether the engine's buffers live on a device (so `kiln bench` times it without the copies)."""
        return self.config.device != "cpu"

    def bind(self, buffers: Buffers, run_options: ort.RunOptions | None = None) -> Binding:
        if self.config.cuda_graph and self._bindings:
            # The captured graph replays into the first binding's addresses.
            raise EngineError("an engine captured as a CUDA graph runs through one binding; this one has one already")
        self._bindings += 1
        return Binding(self, buffers, run_options)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in (cast to the engine's types, any H×W its alignment allows), host arrays out."""
        if self._host is None:
            self._host = self.bind(OrtDeviceBuffers(self.config.device) if self.device_resident else HostBuffers())
        return self._host.run(feeds)

    def device_runner(self, feeds: Mapping[str, np.ndarray]):
        """A function that runs the engine on feeds already in its buffers, and waits for it."""
        if self._host is None:
            self.run(feeds)  # binds the buffers
        self._host.stage(feeds)
        return self._host.execute_and_wait

    def check_feeds(self, feeds: Mapping[str, Any], source: str) -> list[str]:
        """Raise EngineError for inputs the engine cannot take; return warnings for shapes it was not verified at."""
        names = {spec.name for spec in self.inputs}
        missing, extra = sorted(names - set(feeds)), sorted(set(feeds) - names)
        expected = ", ".join(f"{s.name} {s.dtype} {list(s.shape)}" for s in self.inputs)
        if missing or extra:
            what = "; ".join(filter(None, [missing and f"missing {missing}", extra and f"unexpected {extra}"]))
            raise EngineError(f"{source}: {what}", hint=f"the engine takes {expected}")
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        declared = {spec.name: spec.shape for spec in self.inputs}
        for name, shape in shapes.items():
            # An axis the model declares as 0 long (an empty list of axes, say) is the one exception.
            if any(size == 0 and declared[name][axis:axis + 1] != (0,) for axis, size in enumerate(shape)):
                raise EngineError(f"{source}: input {name!r} has shape {list(shape)}, which holds no elements",
                                  hint="give at least one element along every axis")  # fmt: skip
        try:
            padded = self.alignment.padded_shapes(shapes) if self.alignment else shapes
        except ValueError as exc:
            raise EngineError(f"{source}: {exc}", hint=f"the engine takes {expected}") from None
        for spec in self.inputs:
            array, shape = feeds[spec.name], padded[spec.name]
            if array.dtype.name != spec.dtype:
                raise EngineError(f"{source}: input {spec.name!r} is {array.dtype.name}, the engine takes {spec.dtype}")
            if len(shape) != len(spec.shape) or any(isinstance(want, int) and want != got for want, got in zip(spec.shape, shape)):
                note = f" (padded to {list(shape)})" if shape != tuple(array.shape) else ""
                raise EngineError(f"{source}: input {spec.name!r} has shape {list(array.shape)}{note}, the engine takes {list(spec.shape)}")
        if mismatch := derived_mismatch(self.inputs, padded):
            raise EngineError(f"{source}: {mismatch}", hint=f"the engine takes {expected}")
        problem = self.outside(padded)
        return [f"{problem}; the engine was not verified at this shape"] if problem else []

    def outside(self, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        """Why (padded) shapes are outside what the engine was verified at, or None."""
        return self.profile.contains(shapes)

    def as_input_types(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """feeds cast to the engine's input dtypes (an fp16-IO engine takes the same data as its original)."""
        dtypes = {spec.name: spec.dtype for spec in self.inputs}
        return {k: v.astype(dtypes[k]) if dtypes.get(k, v.dtype.name) != v.dtype.name else v for k, v in feeds.items()}


class EngineSet(Engine):
    """An engine of several profiles: one Engine per profile (sessions shared where their settings
    are the same), and each request run by the smallest profile that holds its shape."""

    def __init__(self, members: list[Engine], config: BuildConfig, directory: Path | None = None):
        super().__init__(members[0].session, config, directory)
        self.members = members

    def bind(self, buffers: Buffers, run_options: ort.RunOptions | None = None) -> SetBinding:
        return SetBinding(self, buffers, run_options)

    # Host runs go through the member's own binding: a CUDA graph member takes one binding, whoever runs it.
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.members[self.member_of(feeds)].run(feeds)

    def device_runner(self, feeds: Mapping[str, np.ndarray]):
        return self.members[self.member_of(feeds)].device_runner(feeds)

    def member_of(self, feeds: Mapping[str, Any]) -> int:
        """The index of the profile that runs these feeds (their shapes padded to the alignment)."""
        shapes = {name: tuple(value.shape) for name, value in feeds.items()}
        return self.member_for(self.alignment.padded_shapes(shapes) if self.alignment else shapes)

    def member_for(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """The index of the profile that runs (padded) shapes: the smallest one that holds them; outside
        them all, the largest dynamic one (unverified there, as check_feeds says)."""
        holding = [i for i, m in enumerate(self.members) if m.profile.contains(shapes) is None]
        if holding:
            return min(holding, key=lambda i: (self.members[i].profile.volume(), i))
        dynamic = [i for i, m in enumerate(self.members) if not m.profile.is_static()]
        if not dynamic:
            ranges = "; ".join(self._describe(m.profile) for m in self.members)
            raise EngineError(f"shapes {_listed(shapes)} are in none of the engine's {len(self.members)} profiles, which are all static: {ranges}",
                              hint="give one of those shapes, or rebuild with a profile that holds this one (--profile-from, --shapes)")  # fmt: skip
        return max(dynamic, key=lambda i: (self.members[i].profile.volume(), -i))

    def outside(self, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        if any(m.profile.contains(shapes) is None for m in self.members):
            return None
        return f"shapes {_listed(shapes)} are in none of the engine's {len(self.members)} profiles"

    def label(self, index: int, corner: str) -> str:
        return profile_label(index, self.members[index].profile, corner)

    @staticmethod
    def _describe(profile: Profile) -> str:
        return ", ".join(f"{name} {r.min}" if r.min == r.max else f"{name} {r.min}..{r.max}" for name, r in sorted(profile.dims.items()))


def _listed(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())


class SetBinding:
    """A Binding per profile of an EngineSet, made when a request first needs it; stage() picks the
    profile for the feeds' padded shapes, and execute() and results() follow it."""

    def __init__(self, engine: EngineSet, buffers: Buffers, run_options: ort.RunOptions | None = None):
        self.engine, self.buffers, self.run_options = engine, buffers, run_options
        self.bindings: dict[int, Binding] = {}
        self.current: Binding | None = None
        self.profile: int | None = None  # the index of the profile the last stage() chose

    def stage(self, feeds: Mapping[str, Any]) -> CropBox | None:
        self.profile = self.engine.member_of(feeds)
        if self.profile not in self.bindings:
            self.bindings[self.profile] = self.engine.members[self.profile].bind(self.buffers, self.run_options)
        self.current = self.bindings[self.profile]
        return self.current.stage(feeds)

    def execute(self) -> None:
        self.current.execute()

    def execute_and_wait(self) -> None:
        self.current.execute_and_wait()

    def results(self, box: CropBox | None = None) -> dict[str, Any]:
        return self.current.results(box)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        box = self.stage(feeds)
        self.execute()
        return self.results(box)


class Binding:
    """An engine's inputs and outputs bound by address to buffers from one allocator, once per shape.

    stage(feeds) pads and copies the feeds into the input buffers (binding them first for a new
    shape), execute() runs the engine on them, results(box) hands out copies of the outputs, cropped
    back; run(feeds) does all three."""

    def __init__(self, engine: Engine, buffers: Buffers, run_options: ort.RunOptions | None = None):
        self.engine, self.buffers, self.run_options = engine, buffers, run_options
        self.session = engine.session
        self.io = self.session.io_binding()
        self.bound: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] | None = None
        self.outputs_bound = False  # outputs at fixed addresses here, or allocated by ONNX Runtime each run

    def stage(self, feeds: Mapping[str, Any]) -> CropBox | None:
        alignment = self.engine.alignment
        padded, box = alignment.pad(feeds) if alignment else (dict(feeds), None)
        shapes = {name: tuple(value.shape) for name, value in padded.items()}
        new_shape = shapes != self.shapes
        if new_shape:
            self._bind(shapes)
        for name, value in padded.items():
            self.buffers.write(self.bound[name], value)
        if new_shape and self.engine.config.cuda_graph:
            # Capture now, on this thread, before any other thread works on the device.
            for _ in range(CUDA_GRAPH_RUNS - 1):
                self.execute()
        return box

    def execute(self) -> None:
        if not self.outputs_bound:
            # An output ONNX Runtime allocated stays bound after the run, and the next run must then fit
            # it; Unique's or NonZero's size changes with the data at one input shape, so bind afresh.
            for spec in self.engine.outputs:
                self.io.bind_output(spec.name, self.buffers.device, self.buffers.device_id)
        self.session.run_with_iobinding(self.io, self.run_options)

    def execute_and_wait(self) -> None:
        self.execute()
        self.io.synchronize_outputs()

    def results(self, box: CropBox | None = None) -> dict[str, Any]:
        specs = self.engine.outputs
        if self.outputs_bound:  # copies: the next run overwrites the bound buffers
            values = {spec.name: self.buffers.result(self.bound[spec.name]) for spec in specs}
        else:
            values = {spec.name: self.buffers.from_ort(v) for spec, v in zip(specs, self.io.get_outputs(), strict=True)}
        return self.engine.alignment.crop(values, box) if self.engine.alignment else values

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        box = self.stage(feeds)
        self.execute()
        return self.results(box)

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> None:
        engine, buffers = self.engine, self.buffers
        if engine.config.cuda_graph and self.shapes is not None:
            raise EngineError(f"this engine runs one shape, {self.shapes}, captured as a CUDA graph; got {shapes}",
                              hint="build the engine with a dynamic profile to run other sizes")  # fmt: skip
        self.io.clear_binding_inputs()
        self.io.clear_binding_outputs()
        self.bound = {}
        for spec in engine.inputs:
            self._bind_buffer(spec, shapes[spec.name], self.io.bind_input)
        out_shapes = None
        if all(isinstance(d, int) for spec in engine.outputs for d in spec.shape):
            out_shapes = {spec.name: tuple(spec.shape) for spec in engine.outputs}
        elif not buffers.takes_ort_outputs:
            # Learn the output shapes from one run into buffers ONNX Runtime allocates. Never for a CUDA
            # graph engine (whose outputs load_engine makes static): on an H100 that first run was the one
            # captured, into the addresses ONNX Runtime had allocated.
            for spec in engine.outputs:
                self.io.bind_output(spec.name, buffers.device, buffers.device_id)
            self.session.run_with_iobinding(self.io, self.run_options)
            out_shapes = {spec.name: tuple(v.shape()) for spec, v in zip(engine.outputs, self.io.get_outputs(), strict=True)}
            self.io.clear_binding_outputs()
        self.outputs_bound = out_shapes is not None
        for spec in engine.outputs:
            if self.outputs_bound:
                self._bind_buffer(spec, out_shapes[spec.name], self.io.bind_output)
            else:
                self.io.bind_output(spec.name, buffers.device, buffers.device_id)
        self.shapes = shapes

    def _bind_buffer(self, spec: TensorSpec, shape: tuple[int, ...], bind) -> None:
        buffers = self.buffers
        self.bound[spec.name] = buffer = buffers.empty(shape, spec.dtype)
        bind(spec.name, buffers.device, buffers.device_id, np.dtype(spec.dtype), list(shape), buffers.address(buffer))
