"""Slicer terminology entries for the segments of prompts that name a common organ or lesion.

The table is the JSON resource ``Resources/terminology.json`` (organs, lesions and sides, each a SNOMED CT code
and the prompt words that name it); this module reads it and turns a prompt into the entry string Slicer stores
in a segment's terminology tag. Standard library only: it loads before the engine's packages are installed.
"""
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

TERMINOLOGY_FILE = Path(__file__).resolve().parent / "Resources" / "terminology.json"
NO_CODE = "^^"  # an empty code in an entry string


def codeString(code: dict) -> str:
    """A code of the JSON file as Slicer writes it in entry strings: "SCT^12738006^Brain"."""
    return f"{code['scheme']}^{code['value']}^{code['meaning']}"


@dataclass(frozen=True)
class Terminology:
    """The terminology table: prompt word -> code string, for organs, lesions and sides."""

    categoryContext: str
    regionContext: str
    organCategory: str       # the category of an organ: "Anatomical Structure"
    lesionCategory: str      # the category of a lesion: "Morphologically Altered Structure"
    organs: dict
    pairedOrgans: frozenset  # the organs that take a side ("left lung")
    lesions: dict
    sides: dict

    @classmethod
    def fromJson(cls, table: dict) -> "Terminology":
        def words(entries) -> dict:
            return {word: codeString(entry["code"]) for entry in entries for word in entry["words"]}

        return cls(
            categoryContext=table["categoryContext"], regionContext=table["regionContext"],
            organCategory=codeString(table["categories"]["organ"]),
            lesionCategory=codeString(table["categories"]["lesion"]),
            organs=words(table["organs"]),
            pairedOrgans=frozenset(word for entry in table["organs"] if entry.get("paired") for word in entry["words"]),
            lesions=words(table["lesions"]), sides=words(table["sides"]))

    def entry(self, prompt: str) -> Optional[str]:
        """The terminology entry string for a prompt naming a known organ and/or lesion, else None.

        "left lungs" -> Anatomical Structure / Lung / Left; "brain tumor" -> Morphologically Altered Structure /
        Mass, in the anatomic region Brain. A side is kept only for a paired organ.
        """
        words = [word[:-1] if word[:-1] in self.organs or word[:-1] in self.lesions else word  # "lungs", "tumors"
                 for word in re.findall(r"[a-z]+", prompt.lower())]
        organ = next((word for word in words if word in self.organs), None)
        lesion = next((self.lesions[word] for word in words if word in self.lesions), None)
        side = next((self.sides[word] for word in words if word in self.sides and organ in self.pairedOrgans),
                    NO_CODE)
        if lesion:
            region = self.organs[organ] if organ else NO_CODE
            return "~".join([self.categoryContext, self.lesionCategory, lesion, NO_CODE, self.regionContext, region,
                             side])
        if organ:
            return "~".join([self.categoryContext, self.organCategory, self.organs[organ], side, self.regionContext,
                             NO_CODE, NO_CODE])
        return None


@functools.lru_cache(maxsize=None)
def loadTerminology(path: Path = TERMINOLOGY_FILE) -> Terminology:
    """The terminology table of a JSON file (default: the one installed beside this module), read once."""
    return Terminology.fromJson(json.loads(Path(path).read_text(encoding="utf-8")))


def terminologyEntry(prompt: str) -> Optional[str]:
    """The terminology entry string of `Terminology.entry` for ``prompt``, from the installed table."""
    return loadTerminology().entry(prompt)
