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
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "BETA",
    "DRAW",
    "GAME_COLUMNS",
    "LOSS",
    "MU",
    "SIGMA",
    "WIN",
    "Tournament",
    "draw_margin",
    "generate_league",
    "generate_tournament",
    "read_games",
    "write_games",
]

#: TrueSkill's defaults: prior skill mean and sd, and the performance noise.
MU, SIGMA = 25.0, 25.0 / 3.0
BETA = SIGMA / 2.0

#: A game's result seen from its first side: loses, draws, wins (the categories of the
#: outcome site).
LOSS, DRAW, WIN = 0, 1, 2

#: The columns of :attr:`Tournament.games`.
GAME_COLUMNS = ("winner", "loser", "draw", "home", "period")

PAIRINGS = ("random", "matched")


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
        skills: The true skills that generated a synthetic tournament, else ``None``:
            ``[P]``, or ``[P, R]`` by round (time ``r`` uses column ``r``) for a league
            whose skills drift (:func:`generate_league`).
        beta: The performance noise that generated a synthetic tournament, else ``None``.
        home: ``LongTensor[G]``: +1 where the winner (the first side) played at home, -1
            where the loser did, 0 on neutral ground (the default).
        period: ``LongTensor[G]``: each game's period, the time step of skills that drift
            (:meth:`by_period`); all 0 (skills constant) by default.
        home_advantage: The home advantage that generated a synthetic league, in skill
            units, else ``None``.
        drift: The sd of a skill's change from one period to the next that generated a
            synthetic league, else ``None``.
    """

    winner: Tensor = field(repr=False)
    loser: Tensor = field(repr=False)
    draw: Tensor = field(repr=False)
    time: Tensor = field(repr=False)
    num_players: int
    names: tuple[str, ...] | None = field(default=None, repr=False)
    skills: Tensor | None = field(default=None, repr=False)
    beta: float | None = None
    home: Tensor | None = field(default=None, repr=False)
    period: Tensor | None = field(default=None, repr=False)
    home_advantage: float | None = None
    drift: float | None = None

    def __post_init__(self):
        for name in ("home", "period"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, torch.zeros(len(self.winner), dtype=torch.long))
        names = ("winner", "loser", "draw", "time", "home", "period")
        sizes = {n: len(getattr(self, n)) for n in names}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Tournament: the columns differ in length: {sizes}")
        if len(self.winner) and (self.winner == self.loser).any():
            game = int((self.winner == self.loser).nonzero()[0])
            raise ValueError(f"Tournament: game {game} has the same player on both sides")
        if len(self.winner) and not self.home.abs().le(1).all():
            game = int(self.home.abs().gt(1).nonzero()[0])
            raise ValueError(
                f"Tournament: game {game} has home {int(self.home[game])}; home is +1 (the "
                "first side at home), -1 (the second side) or 0 (neutral)"
            )
        for name in ("winner", "loser"):
            players = getattr(self, name)
            if len(players) and not (0 <= int(players.min()) and players.max() < self.num_players):
                bad = int(((players < 0) | (players >= self.num_players)).nonzero()[0])
                raise ValueError(
                    f"Tournament: game {bad} names player {int(players[bad])} as {name}, but "
                    f"players are numbered 0 to {self.num_players - 1}; raise num_players"
                )

    def __len__(self) -> int:
        return len(self.winner)

    @property
    def games(self) -> Tensor:
        """``LongTensor[G, 5]``: (winner, loser, draw, home, period) per game; the models'
        data argument (:data:`GAME_COLUMNS`)."""
        return torch.stack(
            [self.winner, self.loser, self.draw.long(), self.home, self.period], dim=-1
        )

    @property
    def has_draws(self) -> bool:
        return bool(self.draw.any())

    @property
    def has_home(self) -> bool:
        """Whether any game was played at one side's home."""
        return bool(self.home.any())

    @property
    def num_periods(self) -> int:
        """The number of periods, the last game's period + 1 (1 without :meth:`by_period`)."""
        return int(self.period.max()) + 1 if len(self) else 1

    def by_period(self, length: float) -> Tournament:
        """The same games with periods of ``length`` time units: a game at time ``t`` is
        in period ``floor((t - t_0) / length)``, ``t_0`` the first game's time.

        Raises:
            ValueError: ``length`` is not positive.
        """
        if not length > 0:
            raise ValueError(f"Tournament.by_period: length must be > 0, got {length}")
        start = self.time[0] if len(self) else 0.0
        period = ((self.time - start) / length).floor().long()
        return replace(self, period=period)

    def subset(self, index: Tensor) -> Tournament:
        """The games at ``index`` (a bool mask or indices), same players and periods."""
        return replace(
            self,
            winner=self.winner[index],
            loser=self.loser[index],
            draw=self.draw[index],
            time=self.time[index],
            home=self.home[index],
            period=self.period[index],
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


def _round_robin(num_teams: int) -> list[list[tuple[int, int]]]:
    """A double round robin by the circle method: ``2 (n - 1)`` rounds of (home, away)
    pairs, every pair meeting once at each one's home (``num_teams`` even)."""
    order = list(range(num_teams))
    rounds = []
    for k in range(num_teams - 1):
        pairs = [(order[i], order[num_teams - 1 - i]) for i in range(num_teams // 2)]
        # the fixed team alternates home and away
        rounds.append([(b, a) if i == 0 and k % 2 else (a, b) for i, (a, b) in enumerate(pairs)])
        order = [order[0], order[-1], *order[1:-1]]
    return rounds + [[(b, a) for a, b in pairs] for pairs in rounds]


def generate_league(
    num_teams: int = 20,
    num_seasons: int = 5,
    *,
    home_advantage: float = 0.0,
    drift: float = 0.0,
    draw_probability: float = 0.0,
    rounds_per_period: int = 1,
    mu: float = MU,
    sigma: float = SIGMA,
    beta: float = BETA,
    seed: int = 0,
) -> Tournament:
    r"""A league whose skills drift, played with home advantage and draws.

    Every season is a double round robin (each pair of teams meets once at each one's
    home), one game a team a round; rounds are the time steps (``time`` is the round).
    Skills start at :math:`s_{i,0} \sim N(\mu, \sigma^2)` and take a Gaussian random walk,
    :math:`s_{i,p} = s_{i,p-1} + \tau \epsilon`, from period to period (a period is
    ``rounds_per_period`` consecutive rounds) and across seasons.
    A game between home team :math:`h` and away team :math:`a` in round :math:`r` is
    TrueSkill's with the home side's performance raised by :math:`\eta`: the difference of
    performances :math:`s_{h,r} - s_{a,r} + \eta + \beta (\epsilon_1 - \epsilon_2)`
    decides it, a draw within the margin of ``draw_probability`` (:func:`draw_margin`).

    Arguments:
        num_teams: Number of teams (even).
        num_seasons: Number of seasons, each ``2 (num_teams - 1)`` rounds.
        home_advantage: :math:`\eta`, in skill units.
        drift: :math:`\tau`, the sd of a skill's change from one period to the next.
        draw_probability: Probability that two equal teams on neutral ground draw.
        rounds_per_period: Rounds a skill stays the same (the model's periods are then
            ``Tournament.by_period(rounds_per_period)``).
        mu, sigma: The initial skills' mean and sd.
        beta: The performance noise.
        seed: Seed of the generator (the global RNG is left alone).

    Returns:
        The :class:`Tournament`, periods all 0 (:meth:`Tournament.by_period` sets them),
        with the skills by round (``[P, R]``), ``beta``, ``home_advantage`` and ``drift``.
    """
    if num_teams < 2 or num_teams % 2 or num_seasons < 1:
        raise ValueError(
            "generate_league needs an even num_teams >= 2 and num_seasons >= 1, got "
            f"{num_teams} and {num_seasons}"
        )
    if rounds_per_period < 1:
        raise ValueError(f"generate_league needs rounds_per_period >= 1, got {rounds_per_period}")
    if not sigma > 0 or not beta > 0 or not drift >= 0:
        raise ValueError(
            f"generate_league needs sigma > 0, beta > 0 and drift >= 0, got {sigma}, {beta}, "
            f"{drift}"
        )
    margin = draw_margin(draw_probability, beta)
    generator = torch.Generator().manual_seed(seed)
    season = _round_robin(num_teams)
    num_rounds = num_seasons * len(season)
    steps = torch.randn(num_teams, num_rounds, generator=generator, dtype=torch.float64)
    steps[:, torch.arange(num_rounds) % rounds_per_period != 0] = 0.0
    steps[:, 0] = 0.0
    skills = mu + sigma * torch.randn(num_teams, 1, generator=generator, dtype=torch.float64)
    skills = skills + drift * steps.cumsum(-1)
    pairs = torch.tensor([pair for _ in range(num_seasons) for pairs in season for pair in pairs])
    rounds = torch.arange(num_rounds).repeat_interleave(num_teams // 2)
    home, away = pairs.unbind(-1)
    noise = torch.randn(2, len(pairs), generator=generator, dtype=torch.float64)
    difference = (
        skills[home, rounds] - skills[away, rounds] + home_advantage + beta * (noise[0] - noise[1])
    )
    home_wins = difference >= -margin  # a draw lists the home team first
    return Tournament(
        winner=torch.where(home_wins, home, away),
        loser=torch.where(home_wins, away, home),
        draw=difference.abs() <= margin,
        time=rounds.double(),
        num_players=num_teams,
        skills=skills,
        beta=beta,
        home=torch.where(home_wins, 1, -1),
        home_advantage=home_advantage,
        drift=drift,
    )


# --------------------------------------------------------------------------- CSV files
# What a cell may say. A draw flag (the ``draw`` column) and a result seen from the first
# side (the ``result`` column: football-data's H/D/A, BradleyTerry's 1/0.5/0, words).
_DRAW_FLAGS = {
    **dict.fromkeys(("1", "true", "yes", "y", "t", "draw", "tie", "d", "0.5"), True),
    **dict.fromkeys(("0", "false", "no", "n", "f", ""), False),
}
_RESULTS = {
    **dict.fromkeys(("1", "1.0", "win", "w", "h", "home"), WIN),
    **dict.fromkeys(("0.5", ".5", "draw", "tie", "d", "x", "="), DRAW),
    **dict.fromkeys(("0", "0.0", "loss", "lose", "l", "a", "away"), LOSS),
}
# The pairs of columns that name a game's two sides; ``home, away`` also says the first
# side played at home, unless a ``neutral`` column says otherwise.
_SIDES = (("winner", "loser"), ("first", "second"), ("home", "away"))
_COLUMNS = ("winner", "loser", "first", "second", "away", "result", "draw", "time", "home")
_FORMAT = (
    "one game per line as winner,loser[,draw][,time], or with a header naming the columns: "
    "winner,loser[,draw][,time][,home] or first,second,result[,time][,home] or "
    "home,away,result[,time][,neutral]"
)


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:  # an ISO date or date-time, in days; a date without a zone is taken as UTC,
        # so no daylight-saving hour moves a game across a period's edge
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp() / 86400.0
    except ValueError:
        raise ValueError(
            f"{path}, line {line}: {column} must be a number or an ISO date (2024-08-17), got "
            f"{text!r}"
        ) from None


def _header(path: Path, row: list[str]) -> tuple[list[str], tuple[str, str]] | None:
    """The columns a header line names and the pair naming the sides, or ``None`` when
    the line is a game (no field is a column name)."""
    header = [c.strip().lower() for c in row]
    if not set(header) & set(_COLUMNS):
        return None
    sides = next((pair for pair in _SIDES if set(pair) <= set(header)), None)
    if sides is None:
        raise ValueError(
            f"{path}, line 1: the header {header} names no pair of sides; give winner,loser "
            "or first,second or home,away"
        )
    allowed = {
        "winner": ("winner", "loser", "draw", "time", "home"),
        "first": ("first", "second", "result", "time", "home"),
        "home": ("home", "away", "result", "time", "neutral"),
    }[sides[0]]
    unknown = [c for c in header if c not in allowed]
    if unknown:
        raise ValueError(
            f"{path}, line 1: unknown columns {unknown} beside {','.join(sides)}; its columns "
            f"are {','.join(allowed)}"
        )
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise ValueError(f"{path}, line 1: the columns {repeated} appear twice")
    if "result" in allowed and "result" not in header:
        raise ValueError(
            f"{path}, line 1: the columns {','.join(sides)} need a result column (from "
            f"{sides[0]}'s side: 1/0.5/0, win/draw/loss or H/D/A)"
        )
    return header, sides


def read_games(path: str | os.PathLike[str]) -> Tournament:
    """A tournament from a CSV file of games, one a line.

    Without a header the columns are ``winner,loser[,draw][,time]``. A header line names
    the columns, in any order:

    - ``winner,loser`` with optionally ``draw`` (1/0, true/false, draw/tie, 0.5; empty is
      no draw) and ``home`` (+1 the winner played at home, -1 the loser, 0 or empty
      neutral);
    - ``first,second,result`` with ``result`` seen from the first side: 1/0.5/0,
      win/draw/loss, W/D/L, or football-data's H/D/A; optionally ``home`` (+1, -1, 0 as
      above, for the first side);
    - ``home,away,result``: the first side played at home (``home`` is +1), unless an
      optional ``neutral`` column says 1 (then 0);

    and optionally ``time``: a number or an ISO date (in days). Players are any strings,
    numbered in order of first appearance (``names`` keeps them); games are sorted by
    ``time`` when it is given (stably), else kept in file order.

    Raises:
        FileNotFoundError: There is no file at ``path``.
        ValueError: The file holds no games, its header names unknown columns or not
            enough of them, or a line is malformed; the message names the file, the line
            and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no games file at {path}; write {_FORMAT}")
    with path.open(newline="") as f:
        rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(row)]
    if not rows:
        raise ValueError(f"{path}: no games; write {_FORMAT}")
    found = _header(path, rows[0][1])
    if found is None:
        columns, (first_side, second_side) = (
            ["winner", "loser", "draw", "time"],
            ("winner", "loser"),
        )
    else:
        (columns, (first_side, second_side)), rows = found, rows[1:]
        if not rows:
            raise ValueError(f"{path}: a header and no games; add one game a line below it")
    required = 3 if "result" in columns else 2
    index: dict[str, int] = {}
    winner, loser, draw, time, home = [], [], [], [], []
    timed: list[int] = []  # the lines with a time, and those without
    untimed: list[int] = []
    for line, row in rows:
        if not required <= len(row) <= len(columns):
            raise ValueError(
                f"{path}, line {line}: expected the columns {','.join(columns)}, got "
                f"{len(row)} fields"
            )
        values = dict(zip(columns, (v.strip() for v in row), strict=False))
        a, b = values[first_side], values[second_side]
        if not a or not b:
            raise ValueError(f"{path}, line {line}: a game needs both sides, got {a!r}, {b!r}")
        if a == b:
            raise ValueError(f"{path}, line {line}: {a!r} plays against itself")
        if "result" in columns:
            cell = values.get("result", "").lower()
            if cell not in _RESULTS:
                raise ValueError(
                    f"{path}, line {line}: result must be 1/0.5/0, win/draw/loss, W/D/L or "
                    f"H/D/A (from {first_side}'s side), got {values.get('result', '')!r}"
                )
            result = _RESULTS[cell]
        else:
            cell = values.get("draw", "").lower()
            if cell not in _DRAW_FLAGS:
                raise ValueError(
                    f"{path}, line {line}: draw must be 1/0, true/false, draw/tie or 0.5, got "
                    f"{values['draw']!r}"
                )
            result = DRAW if _DRAW_FLAGS[cell] else WIN
        if first_side == "home":
            neutral = values.get("neutral", "").lower()
            if neutral not in _DRAW_FLAGS:
                raise ValueError(
                    f"{path}, line {line}: neutral must be 1/0 or true/false, got "
                    f"{values['neutral']!r}"
                )
            side = 0 if _DRAW_FLAGS[neutral] else 1
        else:
            cell = values.get("home", "")
            if cell.lstrip("+") not in {"1", "-1", "0", ""}:
                raise ValueError(
                    f"{path}, line {line}: home must be +1 ({first_side} at home), -1 "
                    f"({second_side} at home) or 0 (neutral), got {cell!r}"
                )
            side = int(cell or 0)
        if result == LOSS:
            a, b, side = b, a, -side
        winner.append(index.setdefault(a, len(index)))
        loser.append(index.setdefault(b, len(index)))
        draw.append(result == DRAW)
        home.append(side)
        cell = values.get("time", "")
        (timed if cell else untimed).append(line)
        time.append(_number(path, line, "time", cell) if cell else float(len(time)))
    if timed and untimed:
        # a missing time would sort by row count among dates: refuse, not guess
        raise ValueError(
            f"{path}, line {untimed[0]}: time is empty, but line {timed[0]} gives one; give "
            "every game a time, or none"
        )
    order = torch.tensor(time, dtype=torch.float64).argsort(stable=True)
    return Tournament(
        winner=torch.tensor(winner)[order],
        loser=torch.tensor(loser)[order],
        draw=torch.tensor(draw)[order],
        time=torch.tensor(time, dtype=torch.float64)[order],
        num_players=len(index),
        names=tuple(index),
        home=torch.tensor(home)[order],
    )


def write_games(tournament: Tournament, path: str | os.PathLike[str]) -> None:
    """Write ``tournament`` as a CSV file that :func:`read_games` reads back:
    ``winner,loser,draw,time,home``."""
    names = tournament.names or tuple(str(i) for i in range(tournament.num_players))
    with Path(path).open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["winner", "loser", "draw", "time", "home"])
        for w, ell, d, t, h in zip(
            tournament.winner.tolist(),
            tournament.loser.tolist(),
            tournament.draw.tolist(),
            tournament.time.tolist(),
            tournament.home.tolist(),
            strict=True,
        ):
            out.writerow([names[w], names[ell], int(d), repr(t), h])
