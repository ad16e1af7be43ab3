"""Which primary the sentinels' answers name (cluster/sentinelclient.py)."""

from cluster.sentinelclient import newest_primary


def test_the_highest_epoch_wins_wherever_it_is_in_the_list():
    answers = [(3, "10.0.0.1", 6379), (5, "10.0.0.2", 6379), None, (4, "10.0.0.3", 6380)]
    assert newest_primary(answers) == ("10.0.0.2", 6379)


def test_among_equal_epochs_the_first_sentinel_is_believed():
    assert newest_primary([(2, "a", 1), (2, "b", 2)]) == ("a", 1)


def test_no_usable_answer_names_nothing():
    assert newest_primary([]) is None
    assert newest_primary([None, None]) is None


def test_a_lone_usable_answer_is_taken():
    assert newest_primary([None, (0, "b", 2), None]) == ("b", 2)
