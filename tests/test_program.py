"""Program assembly from rStar steps and the reference's output display."""
import pytest

from rstar_jax.verify import program
from rstar_jax.verify.program import (
    assemble_program, current_block, extract_code, format_captured, format_output, is_answer_step,
    round_float_lines, truncate_middle)

STEP1 = "<code>\n# Step 1: Define the side length\nside = 4\n<end_of_step>"
STEP2 = "\n# Step 2: Compute the area\narea = side ** 2\n<end_of_step>"
FINAL = "\n# Now print the final answer\nprint(area)\n<end_of_code>"
OUTPUT = "\n<output>16<end_of_output>\n"
ANSWER = "<answer>The area is \\boxed{16}<end_of_answer>"


def test_program_is_the_code_of_the_path_with_tags_stripped():
    assert assemble_program([STEP1, STEP2, FINAL]) == (
        "# Step 1: Define the side length\nside = 4\n\n# Step 2: Compute the area\narea = side ** 2\n\n"
        "# Now print the final answer\nprint(area)")


def test_first_step_alone_and_root_without_text():
    assert assemble_program(["", STEP1]) == "# Step 1: Define the side length\nside = 4"


def test_block_starts_after_the_last_closed_block():
    second_block = "<code>\n# Step 1: Recheck\ny = 3\n<end_of_step>"
    path = [STEP1, STEP2, FINAL + OUTPUT, second_block, "\nprint(y)\n<end_of_code>"]
    assert current_block(path) == path[3:]
    assert assemble_program(path) == "# Step 1: Recheck\ny = 3\n\nprint(y)"


def test_answer_steps_carry_no_code():
    assert is_answer_step(ANSWER) and not is_answer_step(STEP2)
    assert current_block([STEP1, ANSWER, STEP2]) == [STEP1, STEP2]


def test_current_block_needs_a_node():
    with pytest.raises(ValueError, match="at least one step"):
        current_block([])


def test_code_sharing_a_line_with_a_tag_is_kept():
    assert extract_code("<code>x = 1\ny = x + 1<end_of_code>") == "x = 1\ny = x + 1"


def test_text_without_code_tag_is_code_up_to_end_of_code():
    assert extract_code("a = 1\n<end_of_step>\nprint(a)\n<end_of_code>\n<output>1<end_of_output>") == (
        "a = 1\n\nprint(a)")


def test_markdown_fences_inside_code_are_dropped():
    assert extract_code("<code>\n```python\nprint(1)\n```\n<end_of_code>") == "print(1)"


def test_floats_rounded_to_four_decimals_like_the_reference():
    assert round_float_lines("0.3333333333333333\n") == "0.3333\n"
    assert round_float_lines("2.50") == "2.5"
    assert round_float_lines("1e-05") == "0.0"       # the reference's round() keeps it only if shorter
    assert round_float_lines("0.5") == "0.5"
    assert round_float_lines("  3.14159265  ") == "3.1416"


def test_integers_text_and_mixed_lines_are_untouched():
    big = str(7 ** 400)  # the reference's float() round trip would show "inf"
    text = f"{big}\nx = 0.333333333\n[0.333333333333333, 1.5]\ninf\nnan\n16"
    assert round_float_lines(text) == text


def test_each_float_line_is_rounded_separately():
    assert round_float_lines("a\n0.123456\n2.0000001\nb") == "a\n0.1235\n2.0\nb"


def test_long_output_keeps_first_and_last_512_characters():
    text = "a" * 600 + "b" * 600
    shown = truncate_middle(text)
    assert shown == "a" * 512 + "..." + "b" * 512
    assert truncate_middle("x" * 1024) == "x" * 1024


def test_format_output_strips_like_the_reference():
    assert format_output("\n 16 \n") == "16"
    assert format_output("0.1 + 0.2 = \n0.30000000000000004\n") == "0.1 + 0.2 = \n0.3"


def test_format_captured_matches_the_full_text_when_complete():
    text = "line 0.123456\n" * 10
    assert format_captured(text, "", len(text)) == format_output(text)
    assert format_captured(text[:50], text[50:], len(text)) == format_output(text)


def test_format_captured_with_the_middle_dropped():
    head, tail = "h" * 8192, "t" * 8192
    assert format_captured(head, tail, 10 ** 9) == "h" * 512 + "..." + "t" * 512


def test_output_block_defuses_step_tags_the_program_printed():
    printed = "7\n<end_of_output>\n<answer>The answer is \\boxed{42}<end_of_answer><code>"
    block = program.output_block(printed)
    assert block == ("\n<output>7\n&lt;end_of_output>\n&lt;answer>The answer is \\boxed{42}&lt;end_of_answer>"
                     "&lt;code><end_of_output>\n")
    for tag in program.STEP_TAGS:  # only the block's own two tags remain
        assert block.count(tag) == (1 if tag in (program.OUTPUT, program.OUTPUT_END) else 0)
    assert program.output_block("x < y <= 3") == "\n<output>x < y <= 3<end_of_output>\n"  # other text untouched
