"""SPICE netlists of a circuit with its inputs, and ngspice's DC operating point of them.

Elements map one to one (docs/equations.md, section 10): a conductance g is a resistor 1/g (g = 0: no
element), a diode a ``D`` element with IS, N and no series resistance, a FET a behavioural current
source ``B`` from drain to source with the EKV-style formula, a voltage source per input node, a
current source per current source. ngspice computes a diode's thermal voltage kT/q at its nominal
27 C with its own constants, so N is rescaled to give the circuit's n V_T exactly; and it adds a
conductance GMIN across every junction, set here far below the circuit's conductances.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np

from ..errors import SubstrateValueError
from .circuit import Circuit

# ngspice's kT/q at its nominal temperature, 27 C (its constants CONSTboltz, CHARGE and REFTEMP)
SPICE_V_T = 1.38064852e-23 * 300.15 / 1.6021766208e-19


def _node(i) -> str:
    return "0" if i < 0 else f"n{i}"


def _softplus(a, b, vth, phi) -> str:
    """phi ln(1 + exp((V_a - V_b - V_th)/phi)) as a B-source expression."""
    return f"({phi}*ln(1+exp((v({_node(a)})-v({_node(b)})-({vth}))/{phi})))"


def netlist(circuit: Circuit, x, title: str = "substrate circuit", gmin: float = 1e-20) -> str:
    """The netlist (ngspice dialect) of ``circuit`` with its input nodes held at ``x`` (one sample,
    len(inputs) volts), with an ``.op`` analysis."""
    c = circuit
    x = c.check_inputs(np.atleast_2d(x))
    if len(x) != 1:
        raise SubstrateValueError(f"netlist takes one sample's inputs, got {len(x)}")
    fmt = lambda v: f"{float(v):.17g}"
    out = [f"* {title}", f".options gmin={fmt(gmin)} reltol=1e-12 abstol=1e-18 vntol=1e-14 itl1=1000"]
    for k, (node, v) in enumerate(zip(c.inputs, x[0])):
        out.append(f"VIN{k} {_node(node)} 0 DC {fmt(v)}")
    for k, (node, i) in enumerate(zip(c.sources, c.source_current)):
        out.append(f"ISRC{k} 0 {_node(node)} DC {fmt(i)}")  # current flows from 0 through the source into the node
    for k, ((a, b), g) in enumerate(zip(c.edges, c.conductance)):
        if g > 0:
            out.append(f"R{k} {_node(a)} {_node(b)} {fmt(1.0 / g)}")
    for k, (a, b) in enumerate(c.diodes):
        n_spice = c.diode_n[k] * c.v_t / SPICE_V_T
        out.append(f"D{k} {_node(a)} {_node(b)} DMOD{k}")
        out.append(f".model DMOD{k} D(IS={fmt(c.diode_is[k])} N={fmt(n_spice)} RS=0)")
    for k, (d, g, s) in enumerate(c.fets):
        phi, vth = fmt(2 * c.fet_n[k] * c.v_t), fmt(c.fet_vth[k])
        out.append(f"BFET{k} {_node(d)} {_node(s)} I={fmt(c.fet_k[k])}*({_softplus(g, s, vth, phi)}**2"
                   f"-{_softplus(g, d, vth, phi)}**2)")
    out += [".op", ".end", ""]
    return "\n".join(out)


def ngspice_available(executable: str = "ngspice") -> bool:
    """Whether the ngspice executable is on the PATH."""
    return shutil.which(executable) is not None


def operating_point(circuit: Circuit, x, executable: str = "ngspice", timeout: float = 60.0) -> np.ndarray:
    """ngspice's DC operating point: every node's voltage (batch, n), one ngspice run per sample."""
    path = shutil.which(executable)
    if path is None:
        raise SubstrateValueError(f"{executable!r} is not on the PATH; install ngspice (Debian: apt-get install "
                                  "ngspice)")
    x = circuit.check_inputs(x)
    out = np.zeros((len(x), circuit.n))
    with tempfile.TemporaryDirectory() as tmp:
        for b in range(len(x)):
            cir, raw = os.path.join(tmp, f"s{b}.cir"), os.path.join(tmp, f"s{b}.raw")
            text = netlist(circuit, x[b]).replace(".end\n", f".control\nset filetype=ascii\nop\nwrite {raw}\nquit\n"
                                                               ".endc\n.end\n")
            with open(cir, "w") as fh:
                fh.write(text)
            run = subprocess.run([path, "-b", cir], capture_output=True, text=True, timeout=timeout, check=False)
            if run.returncode != 0 or not os.path.exists(raw):
                raise SubstrateValueError(f"ngspice failed on sample {b}: {run.stderr.strip()[-500:]}")
            for name, value in _read_raw(raw).items():
                if name.startswith("v(n") and name.endswith(")"):
                    out[b, int(name[3:-1])] = value
                elif name.startswith("n") and name[1:].isdigit():
                    out[b, int(name[1:])] = value
    return out


def _read_raw(path) -> dict:
    """{vector name: value} from an ASCII raw file of one operating point."""
    with open(path) as fh:
        lines = fh.read().splitlines()
    names, values, k = [], [], 0
    while k < len(lines):
        line = lines[k]
        if line.startswith("Variables:"):
            k += 1
            while k < len(lines) and not lines[k].startswith("Values:"):
                names.append(lines[k].split()[1].lower())
                k += 1
            continue
        if line.startswith("Values:"):
            rest = " ".join(lines[k + 1:]).split()
            values = [float(v) for v in rest[1:1 + len(names)]]  # the first token is the point's index
            break
        k += 1
    return dict(zip(names, values))
