import math

import pytest
import torch
from torch import Tensor
from torch.special import log_ndtr, ndtr

from models.tournaments import (
    BETA,
    MU,
    SIGMA,
    Tournament,
    draw_margin,
    generate_tournament,
    read_games,
    write_games,
)


def _first_wins(t: Tournament) -> tuple[Tensor, Tensor, Tensor]:
    """Games seen from the lower-numbered player, whose result is random (the winner's
    column always wins): (first, second, first won)."""
    first = torch.minimum(t.winner, t.loser)
    second = torch.maximum(t.winner, t.loser)
    return first, second, t.winner == first


def test_generator_reproduces_the_skill_distribution():
    t = generate_tournament(20_000, 10, seed=1)
    n = len(t.skills)
    assert abs(t.skills.mean() - MU) < 5 * SIGMA / math.sqrt(n)
    # the sample variance's standard error is sigma² sqrt(2 / (n - 1))
    assert abs(t.skills.var() - SIGMA**2) < 5 * SIGMA**2 * math.sqrt(2 / (n - 1))


def test_generator_reproduces_beta_by_maximum_likelihood():
    t = generate_tournament(300, 40_000, seed=2)
    first, second, won = _first_wins(t)
    gap = (t.skills[first] - t.skills[second]) / math.sqrt(2)
    sign = won.double() * 2 - 1

    def log_lik(beta):
        return log_ndtr(sign * gap / beta).sum()

    betas = torch.linspace(3.5, 5.0, 3001, dtype=torch.float64)
    values = torch.stack([log_lik(b) for b in betas])
    best = betas[values.argmax()]
    # standard error from the curvature of the log-likelihood at its maximum
    h = 1e-3
    curvature = (log_lik(best + h) - 2 * log_lik(best) + log_lik(best - h)) / h**2
    se = (-1 / curvature).sqrt()
    assert abs(best - BETA) < 5 * se, (best, se)


@pytest.mark.parametrize("pairing", ["random", "matched"])
def test_generator_draw_rate_matches_the_margin(pairing):
    t = generate_tournament(300, 20_000, draw_probability=0.2, pairing=pairing, seed=3)
    margin = draw_margin(0.2, BETA)
    gap = t.skills[t.winner] - t.skills[t.loser]
    scale = math.sqrt(2) * BETA
    p = ndtr((margin - gap) / scale) - ndtr((-margin - gap) / scale)
    z = (t.draw.double().sum() - p.sum()) / (p * (1 - p)).sum().sqrt()
    assert abs(z) < 5
    # and the non-drawn games follow Phi((gap - margin) / scale) given no draw
    first, second, won = _first_wins(t)
    decided = ~t.draw
    g = (t.skills[first] - t.skills[second])[decided]
    win = ndtr((g - margin) / scale)
    loss = ndtr((-g - margin) / scale)
    p_win = win / (win + loss)
    z = (won[decided].double().sum() - p_win.sum()) / (p_win * (1 - p_win)).sum().sqrt()
    assert abs(z) < 5


def test_matched_pairing_draws_opponents_by_match_quality():
    t = generate_tournament(200, 20_000, pairing="matched", seed=4)
    s = t.skills
    weights = torch.exp(-((s[:, None] - s) ** 2) / (4 * BETA**2))
    weights.fill_diagonal_(0)
    weights /= weights.sum(-1, keepdim=True)
    # the first player is uniform, so E[gap²] averages each player's weighted gap²
    expected = (weights * (s[:, None] - s) ** 2).sum(-1)
    second_moment = ((s[:, None] - s) ** 4 * weights).sum(-1)
    mean = expected.mean()
    var = second_moment.mean() - mean**2  # of one game's gap², over both draws
    observed = ((s[t.winner] - s[t.loser]) ** 2).mean()
    assert abs(observed - mean) < 5 * (var / len(t)).sqrt()
    random = generate_tournament(200, 20_000, seed=4)
    assert observed < ((s[random.winner] - s[random.loser]) ** 2).mean() / 3


def test_generator_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = generate_tournament(20, 100, seed=5), generate_tournament(20, 100, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.games, b.games) and torch.equal(a.skills, b.skills)
    assert not torch.equal(a.games, generate_tournament(20, 100, seed=6).games)


def test_csv_round_trip_keeps_players_draws_and_order(tmp_path):
    t = generate_tournament(15, 200, draw_probability=0.3, seed=7)
    write_games(t, tmp_path / "games.csv")
    back = read_games(tmp_path / "games.csv")
    assert back.has_draws and torch.equal(back.draw, t.draw)
    assert torch.equal(back.time, t.time)
    names = [int(n) for n in back.names]
    assert [names[i] for i in back.winner] == t.winner.tolist()
    assert [names[i] for i in back.loser] == t.loser.tolist()


def test_read_games_without_header_sorts_by_time_and_names_players(tmp_path):
    path = tmp_path / "games.csv"
    path.write_text("ann,bob,0,3\nbob,cy,1,1\ncy,ann,,2\n")
    t = read_games(path)
    assert t.names == ("ann", "bob", "cy") and t.num_players == 3
    assert t.time.tolist() == [1.0, 2.0, 3.0]
    assert t.winner.tolist() == [1, 2, 0] and t.loser.tolist() == [2, 0, 1]
    assert t.draw.tolist() == [True, False, False]
    path.write_text("loser,winner\nann,bob\n")  # a header in another order
    t = read_games(path)
    assert t.names[int(t.winner[0])] == "bob"


@pytest.mark.parametrize(
    "text, match",
    [
        ("a,b\nc\n", "line 2: expected"),
        ("a,b,maybe\n", "line 1: draw must be"),
        ("a,a\n", "line 1: 'a' plays against itself"),
        ("a,b,0,noon\n", "line 1: time must be a number"),
        ("winner,loser,score\n", "unknown columns"),
    ],
)
def test_read_games_names_the_bad_line(tmp_path, text, match):
    path = tmp_path / "games.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_games(path)


def test_read_games_says_what_to_write_when_the_file_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="winner,loser"):
        read_games(tmp_path / "nope.csv")


def test_split_subset_and_involving():
    t = generate_tournament(10, 100, seed=8)
    train, test = t.split(0.8)
    assert len(train) == 80 and len(test) == 20
    assert torch.equal(torch.cat([train.winner, test.winner]), t.winner)
    mask = t.involving(torch.tensor([3]))
    assert torch.equal(mask, (t.winner == 3) | (t.loser == 3))
    pair = torch.tensor([3, 5])
    among = t.among(pair)
    assert torch.equal(among, torch.isin(t.winner, pair) & torch.isin(t.loser, pair))
    with pytest.raises(ValueError, match="fraction"):
        t.split(1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_players": 1}, "num_players >= 2"),
        ({"pairing": "swiss"}, "pairing"),
        ({"draw_probability": 1.0}, "draw_probability"),
        ({"beta": 0.0}, "beta > 0"),
    ],
)
def test_generator_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_tournament(**{"num_players": 10, "num_games": 10, **kwargs})
