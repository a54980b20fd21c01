"""Two-player game records: TrueSkill's generative model, and plain CSV files of games.

A :class:`Tournament` holds games in the order they were played, each a winner, a loser and
whether it was a draw (a draw's two players are listed in either order). Synthetic
tournaments carry the true skills that generated them. Nothing here touches the network.

Example:
    >>> games = generate_tournament(50, 400, seed=0)
    >>> train, test = games.split(0.8)
    >>> len(train), len(test), train.num_players
    (320, 80, 50)
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "BETA",
    "MU",
    "SIGMA",
    "Tournament",
    "draw_margin",
    "generate_tournament",
    "read_games",
    "write_games",
]

#: TrueSkill's defaults: prior skill mean and sd, and the performance noise.
MU, SIGMA = 25.0, 25.0 / 3.0
BETA = SIGMA / 2.0

PAIRINGS = ("random", "matched")
_TRUE = {"1", "true", "yes", "y", "t", "draw"}
_FALSE = {"0", "false", "no", "n", "f", ""}


@dataclass(frozen=True, eq=False)
class Tournament:
    """Games between ``num_players`` players, in the order they were played.

    Attributes:
        winner: ``LongTensor[G]``, the winner's index (for a draw, either player).
        loser: ``LongTensor[G]``, the loser's index (for a draw, the other player).
        draw: ``BoolTensor[G]``, whether the game was drawn.
        time: ``Tensor[G]`` (float64), when each game was played, non-decreasing.
        num_players: Number of players; indices run from 0 to ``num_players - 1``.
        names: Each player's name (from a CSV file), or ``None`` for synthetic players.
        skills: The true skills that generated a synthetic tournament, else ``None``.
        beta: The performance noise that generated a synthetic tournament, else ``None``.
    """

    winner: Tensor = field(repr=False)
    loser: Tensor = field(repr=False)
    draw: Tensor = field(repr=False)
    time: Tensor = field(repr=False)
    num_players: int
    names: tuple[str, ...] | None = field(default=None, repr=False)
    skills: Tensor | None = field(default=None, repr=False)
    beta: float | None = None

    def __post_init__(self):
        sizes = {len(self.winner), len(self.loser), len(self.draw), len(self.time)}
        if len(sizes) != 1:
            raise ValueError(f"Tournament: winner, loser, draw and time differ in length {sizes}")
        if len(self.winner) and (self.winner == self.loser).any():
            game = int((self.winner == self.loser).nonzero()[0])
            raise ValueError(f"Tournament: game {game} has the same player on both sides")

    def __len__(self) -> int:
        return len(self.winner)

    @property
    def games(self) -> Tensor:
        """``LongTensor[G, 3]``: (winner, loser, draw) per game; the models' data argument."""
        return torch.stack([self.winner, self.loser, self.draw.long()], dim=-1)

    @property
    def has_draws(self) -> bool:
        return bool(self.draw.any())

    def subset(self, index: Tensor) -> Tournament:
        """The games at ``index`` (a bool mask or indices), same players."""
        return replace(
            self,
            winner=self.winner[index],
            loser=self.loser[index],
            draw=self.draw[index],
            time=self.time[index],
        )

    def split(self, fraction: float) -> tuple[Tournament, Tournament]:
        """The first ``fraction`` of the games and the rest, so the test games come later."""
        if not 0 < fraction < 1:
            raise ValueError(f"Tournament.split: fraction must be in (0, 1), got {fraction}")
        cut = int(fraction * len(self))
        return self.subset(slice(None, cut)), self.subset(slice(cut, None))

    def involving(self, players: Tensor) -> Tensor:
        """Bool mask of the games in which any of ``players`` took part."""
        member = self._members(players)
        return member[self.winner] | member[self.loser]

    def among(self, players: Tensor) -> Tensor:
        """Bool mask of the games between two of ``players``."""
        member = self._members(players)
        return member[self.winner] & member[self.loser]

    def _members(self, players: Tensor) -> Tensor:
        member = torch.zeros(self.num_players, dtype=torch.bool)
        member[players] = True
        return member


def draw_margin(draw_probability: float, beta: float) -> float:
    r"""TrueSkill's draw margin :math:`\varepsilon`: two equally skilled players draw (their
    performances differ by less than :math:`\varepsilon`) with ``draw_probability``."""
    if not 0 <= draw_probability < 1:
        raise ValueError(f"draw_probability must be in [0, 1), got {draw_probability}")
    normal = torch.distributions.Normal(0.0, 1.0)
    return float(normal.icdf(torch.tensor((draw_probability + 1) / 2))) * math.sqrt(2) * beta


def generate_tournament(
    num_players: int = 500,
    num_games: int = 20_000,
    *,
    mu: float = MU,
    sigma: float = SIGMA,
    beta: float = BETA,
    pairing: str = "random",
    draw_probability: float = 0.0,
    seed: int = 0,
) -> Tournament:
    r"""A tournament drawn from TrueSkill's generative model, with static skills.

    Skills :math:`s_i \sim N(\mu, \sigma^2)`; in each game the two players perform
    :math:`p \sim N(s, \beta^2)` and the higher performance wins, unless the performances
    differ by less than the draw margin (:func:`draw_margin`), which is a draw. So
    :math:`P(i \text{ beats } j) = \Phi((s_i - s_j - \varepsilon) / (\sqrt 2 \beta))`.

    Arguments:
        num_players: Number of players.
        num_games: Number of games, played one after the other (``time`` is 0, 1, ...).
        mu: Mean of the skills.
        sigma: Standard deviation of the skills.
        beta: Standard deviation of a performance around the skill.
        pairing: ``"random"``: two distinct players drawn uniformly. ``"matched"``: the
            first uniformly, the opponent with probability proportional to TrueSkill's
            match quality at the true skills, :math:`\exp(-(s_i - s_j)^2 / (4\beta^2))`.
        draw_probability: Probability that two equally skilled players draw.
        seed: Seed of the generator (the global RNG is left alone).

    Returns:
        The :class:`Tournament`, with the true ``skills`` and ``beta``.
    """
    if num_players < 2 or num_games < 1:
        raise ValueError(
            f"generate_tournament needs num_players >= 2 and num_games >= 1, got "
            f"{num_players} and {num_games}"
        )
    if not sigma > 0 or not beta > 0:
        raise ValueError(f"generate_tournament needs sigma > 0 and beta > 0, got {sigma}, {beta}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    margin = draw_margin(draw_probability, beta)
    generator = torch.Generator().manual_seed(seed)
    skills = mu + sigma * torch.randn(num_players, generator=generator, dtype=torch.float64)
    first = torch.randint(num_players, (num_games,), generator=generator)
    if pairing == "random":
        other = torch.randint(num_players - 1, (num_games,), generator=generator)
        second = other + (other >= first)
    else:
        second = torch.empty_like(first)
        for chunk in torch.arange(num_games).split(4096):  # bounded memory: chunk x players
            gap = skills[first[chunk], None] - skills
            quality = torch.exp(-(gap**2) / (4 * beta**2))
            quality[torch.arange(len(chunk)), first[chunk]] = 0.0
            second[chunk] = torch.multinomial(quality, 1, generator=generator).squeeze(-1)
    noise = torch.randn(2, num_games, generator=generator, dtype=torch.float64)
    difference = skills[first] - skills[second] + beta * (noise[0] - noise[1])
    first_wins = difference > 0
    return Tournament(
        winner=torch.where(first_wins, first, second),
        loser=torch.where(first_wins, second, first),
        draw=difference.abs() <= margin,
        time=torch.arange(num_games, dtype=torch.float64),
        num_players=num_players,
        skills=skills,
        beta=beta,
    )


def read_games(path: str | os.PathLike[str]) -> Tournament:
    """A tournament from a CSV file with one game per line: ``winner,loser[,draw][,time]``.

    Players are any strings, numbered in order of first appearance (``names`` keeps them).
    ``draw`` is 1/0 or true/false (empty means no draw); games are sorted by ``time``
    when it is given (stably), else kept in file order. A header line naming the columns
    (``winner``, ``loser``, and optionally ``draw`` and ``time``, in any order) is
    recognized; without one the columns are taken in that order.

    Raises:
        FileNotFoundError: There is no file at ``path``.
        ValueError: A line is malformed; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no games file at {path}; write one game per line as winner,loser[,draw][,time]"
        )
    with path.open(newline="") as f:
        rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if row]
    if not rows:
        raise ValueError(f"{path}: no games")
    columns = ["winner", "loser", "draw", "time"]
    header = [c.strip().lower() for c in rows[0][1]]
    if "winner" in header and "loser" in header:
        unknown = set(header) - set(columns)
        if unknown:
            raise ValueError(f"{path}: unknown columns {sorted(unknown)}; expected {columns}")
        columns = header
        rows = rows[1:]
    index: dict[str, int] = {}
    winner, loser, draw, time = [], [], [], []
    for line, row in rows:
        if len(row) < 2 or len(row) > len(columns):
            raise ValueError(
                f"{path}, line {line}: expected {', '.join(columns[:2])}[, "
                f"{', '.join(columns[2:])}], got {len(row)} fields"
            )
        values = dict(zip(columns, (v.strip() for v in row), strict=False))
        if values["winner"] == values["loser"]:
            raise ValueError(f"{path}, line {line}: {values['winner']!r} plays against itself")
        winner.append(index.setdefault(values["winner"], len(index)))
        loser.append(index.setdefault(values["loser"], len(index)))
        flag = values.get("draw", "").lower()
        if flag not in _TRUE | _FALSE:
            raise ValueError(f"{path}, line {line}: draw must be 1/0 or true/false, got {flag!r}")
        draw.append(flag in _TRUE)
        try:
            time.append(float(values["time"]) if values.get("time") else float(len(time)))
        except ValueError:
            raise ValueError(
                f"{path}, line {line}: time must be a number, got {values['time']!r}"
            ) from None
    order = torch.tensor(time, dtype=torch.float64).argsort(stable=True)
    return Tournament(
        winner=torch.tensor(winner)[order],
        loser=torch.tensor(loser)[order],
        draw=torch.tensor(draw)[order],
        time=torch.tensor(time, dtype=torch.float64)[order],
        num_players=len(index),
        names=tuple(index),
    )


def write_games(tournament: Tournament, path: str | os.PathLike[str]) -> None:
    """Write ``tournament`` as a CSV file that :func:`read_games` reads back."""
    names = tournament.names or tuple(str(i) for i in range(tournament.num_players))
    with Path(path).open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["winner", "loser", "draw", "time"])
        for w, ell, d, t in zip(
            tournament.winner.tolist(),
            tournament.loser.tolist(),
            tournament.draw.tolist(),
            tournament.time.tolist(),
            strict=True,
        ):
            out.writerow([names[w], names[ell], int(d), repr(t)])
