"""tools/nvrtc_registers.py's reading of a kernel's SASS (the part that needs no GPU and no
NVRTC): the down threadgroups' loads and mma after their wait, in order."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import nvrtc_registers  # noqa: E402

# A made-up SASS listing in cuobjdump's form: the rule's loads, the wait's loop, the down tile
SASS = """
        /*0160*/                   LDG.E.U16 R7, desc[UR8][R8.64] ;
        /*1990*/                   LDGSTS.E.BYPASS.128 [R7], desc[UR8][R4.64] ;
        /*3050*/                   NANOSLEEP 0x40 ;
        /*3060*/                   LDG.E.STRONG.SYS R12, desc[UR8][R14.64+0x8] ;
        /*3080*/               @!P2 BRA 0x3050 ;
        /*30a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*3130*/               @!P0 LDG.E.64 R9, desc[UR8][R8.64] ;
        /*3140*/                   LDS.U16 R11, [R10] ;
        /*3150*/                   HMMA.16816.F32.BF16 R8, R8, R12, RZ ;
        /*3160*/               @!P0 LDG.E.64 R9, desc[UR8][R8.64+0x20] ;
        /*3170*/                   HMMA.16816.F32.BF16 R8, R12, R6, R8 ;
        /*3180*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*3190*/                   LDG.E.U16 R2, desc[UR10][R2.64] ;
"""


def test_tail_sequence_reads_the_down_tile_after_the_wait():
    assert nvrtc_registers.tail_sequence(SASS) == "LDG BAR.SYNC LDG.64 LDS HMMA LDG.64 HMMA"


def test_tail_sequence_without_a_wait_is_empty():
    assert nvrtc_registers.tail_sequence(SASS.replace("NANOSLEEP 0x40", "NOP")) == ""
