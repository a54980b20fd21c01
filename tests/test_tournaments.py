import math
from dataclasses import replace

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
    generate_league,
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
        ("winner,loser,score\n", "unknown columns \\['score'\\] beside winner,loser"),
        ("first,second\nA,B\n", "line 1: the columns first,second need a result column"),
        ("team1,team2,result\nA,B,1\n", "names no pair of sides"),
        ("first,second,result\nA,B,2\n", "line 2: result must be 1/0.5/0"),
        ("first,second,result,home\nA,B,1,2\n", "line 2: home must be \\+1"),
        ("home,away,result,time\nA,B,H,someday\n", "line 2: time must be a number or an ISO date"),
        ("winner,loser,winner\nA,B,C\n", "appear twice"),
        ("home,away,result,draw\nA,B,H,0\n", "unknown columns \\['draw'\\] beside home,away"),
        (
            "home,away,result,time\nA,B,H,2024-08-10\nB,A,D,\n",
            "line 3: time is empty, but line 2 gives one",
        ),
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


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_read_games_refuses_an_empty_file_saying_what_to_write(tmp_path, text):
    path = tmp_path / "games.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match="games.csv: no games; write one game per line as winner"):
        read_games(path)


@pytest.mark.parametrize("header", ["winner,loser", "home,away,result", "first,second,result"])
def test_read_games_refuses_a_header_without_games(tmp_path, header):
    path = tmp_path / "games.csv"
    path.write_text(header + "\n")
    with pytest.raises(ValueError, match="games.csv: a header and no games"):
        read_games(path)


def test_read_games_reads_home_away_files_as_football_data_writes_them(tmp_path):
    path = tmp_path / "games.csv"
    path.write_text("home,away,result\nA,B,H\nB,C,D\nC,A,A\nA,C,0.5\n")
    t = read_games(path)
    assert t.names == ("A", "B", "C")
    # A beat B at home; B and C drew at B's; A won at C's; A and C drew at A's
    assert t.winner.tolist() == [0, 1, 0, 0] and t.loser.tolist() == [1, 2, 2, 2]
    assert t.draw.tolist() == [False, True, False, True]
    assert t.home.tolist() == [1, 1, -1, 1]
    path.write_text("home,away,result,neutral\nA,B,H,1\nA,B,A,0\n")
    assert read_games(path).home.tolist() == [0, -1]


@pytest.mark.parametrize("tie", ["0.5", "tie", "draw", "D", "½".replace("½", "d")])
def test_read_games_takes_ties_as_bradley_terry_files_write_them(tmp_path, tie):
    path = tmp_path / "games.csv"
    path.write_text(f"first,second,result\nA,B,{tie}\nB,A,1\nA,B,0\n")
    t = read_games(path)
    assert t.draw.tolist() == [True, False, False]
    assert t.winner.tolist() == [0, 1, 1]
    if tie in ("0.5", "tie", "draw"):  # the draw column takes them too
        path.write_text(f"winner,loser,draw\nA,B,{tie}\n")
        assert read_games(path).draw.tolist() == [True]


def test_read_games_sorts_iso_dates_and_keeps_home_from_the_winners_side(tmp_path):
    path = tmp_path / "games.csv"
    path.write_text("first,second,result,time,home\nA,B,0,2024-08-17,1\nB,C,1,2024-08-10,-1\n")
    t = read_games(path)
    assert t.time[1] - t.time[0] == 7.0  # days
    # B beat C away (first game by date); B beat A away: home is -1 from the winner's side
    assert t.winner.tolist() == [0, 0] and t.home.tolist() == [-1, -1]


def test_league_is_a_double_round_robin_with_home_advantage_and_drift():
    league = generate_league(
        6, 2, home_advantage=4.0, drift=1.5, draw_probability=0.3, rounds_per_period=5, seed=0
    )
    assert len(league) == 2 * 2 * 5 * 3 and league.skills.shape == (6, 20)
    home = torch.where(league.home == 1, league.winner, league.loser)
    away = torch.where(league.home == 1, league.loser, league.winner)
    first_season = league.time < 10
    pairs = {(int(h), int(a)) for h, a in zip(home[first_season], away[first_season], strict=True)}
    assert len(pairs) == 30  # every ordered pair once a season
    for r in range(10):  # one game a team a round
        teams = torch.cat([home[league.time == r], away[league.time == r]])
        assert sorted(teams.tolist()) == list(range(6))
    # skills stay put within a period and step between periods
    steps = league.skills.diff(dim=-1)
    assert (steps[:, [i for i in range(19) if (i + 1) % 5]] == 0).all()
    assert (steps[:, 4::5] != 0).all()
    assert league.home_advantage == 4.0 and league.drift == 1.5
    assert league.by_period(5).num_periods == 4


def test_league_home_win_rate_matches_the_home_advantage():
    league = generate_league(20, 5, home_advantage=3.0, drift=0.5, seed=1)
    home = torch.where(league.home == 1, league.winner, league.loser)
    away = torch.where(league.home == 1, league.loser, league.winner)
    r = league.time.long()
    # given the skills, each game is won at home with Phi((s_h - s_a + eta) / (sqrt 2 beta))
    p = ndtr((league.skills[home, r] - league.skills[away, r] + 3.0) / (math.sqrt(2) * BETA))
    se = float((p * (1 - p)).sum().sqrt() / len(league))
    assert abs(float((league.home == 1).double().mean() - p.mean())) < 5 * se
    # and without a home advantage the same formula at eta = 0
    flat = generate_league(20, 5, drift=0.5, seed=1)
    p0 = ndtr((flat.skills[home, r] - flat.skills[away, r]) / (math.sqrt(2) * BETA))
    se0 = float((p0 * (1 - p0)).sum().sqrt() / len(flat))
    assert abs(float((flat.home == 1).double().mean() - p0.mean())) < 5 * se0


def test_tournament_refuses_players_out_of_range_and_bad_home():
    t = generate_tournament(5, 10, seed=0)
    with pytest.raises(ValueError, match="game 0 names player 7 as winner, but players are"):
        Tournament(
            winner=torch.tensor([7]),
            loser=torch.tensor([1]),
            draw=torch.tensor([False]),
            time=torch.tensor([0.0]),
            num_players=5,
        )
    with pytest.raises(ValueError, match="game 0 has home 3"):
        replace(t, home=torch.full((10,), 3))
    with pytest.raises(ValueError, match="length must be > 0"):
        t.by_period(0)
