"""Offline stage: ScanNet readers, the ClipCap teacher and the sharded pair-store writer."""
